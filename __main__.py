from torchslim.cli.app import main

main()
