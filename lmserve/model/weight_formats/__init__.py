"""How a projection's weight is stored and multiplied, one module per weight type:

    int8.py   int8 weights: W8A8, int8 activations too
    int4.py   4-bit weights: W4A8, int8 activations
"""
