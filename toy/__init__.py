"""A toy world small enough to train a text-to-image model from scratch on a CPU, so that SINE's
effects can be seen and measured, not only its shapes checked.

    world.py      the scenes: one shape on a plain background, drawn from a seed, with a caption
    score.py      reading a picture back: where the object is, its pattern, shape and colours; fidelity, edit
    base.py       the toy base model's sizes, in the SD v1 layout
    pretrain.py   trains that base from scratch (python -m toy.pretrain)
    replicate.py  the paper's experiments through train.py and edit.py (python -m toy.replicate)
"""
