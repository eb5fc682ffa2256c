"""Architectures written the way users and other libraries write them, outside torchslim:
one module per family (tests/zoo/<name>.py), each a plain user module with ``build()``
plus what the suite needs: ``INPUTS`` (forward's inputs as CLI flags), ``DATA`` (its data
kind, see data.py), ``EPOCHS`` and optionally ``LR`` (how the "user" trains it: briefly,
but enough that int8-vs-fp32 agreement means something) and ``hand_count(c)`` (its
parameters and MACs by hand, see count.py).

tests/test_zoo.py and examples/zoo_matrix.py run every family in FAMILIES; adding an
architecture is its module plus one line here.
"""

FAMILIES = (
    "mynet",         # the FaultNet: 4 ConvBN blocks, functional relu / max_pool
    "resnet",        # BasicBlocks, 1x1 downsample, residual adds
    "vgg",           # VGG-BN, Sequential features + classifier
    "densenet",      # concatenation of every earlier feature map
    "squeezenet",    # Fire modules, conv classifier
    "convnext",      # depthwise 7x7, LayerNorm via permute, GELU, layer scale
    "mobilenetv2",   # inverted residuals
    "mobilenetv3",   # squeeze-excitation, hardswish / hardsigmoid
    "efficientnet",  # MBConv + SE + functional SiLU
    "regnet",        # grouped 3x3 convs
    "shufflenet",    # channel split and shuffle by view / transpose
    "lstm_text",     # Embedding -> 2-layer LSTM -> Linear, (B, 20) int64 token ids
    "txencoder",     # nn.TransformerEncoder over (B, 16, 32) floats
    "twoinput",      # an image and a feature vector
    "vit",           # timm-style ViT: patch conv, class token, position embedding, fused qkv
)
