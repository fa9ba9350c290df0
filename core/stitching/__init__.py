"""Model stitching: the front of one network, a trained stitching transform, the end of another.

- ``stitch``: the stitched network, the transform's initialisations and targets;
- ``stage``: the stitch stage (``stitch.py``);
- ``api``: this system's part of the Python API (``stitch_models``).
"""
