"""Model stitching: the front of one network, a trained stitching transform, the end of another.

- ``stitch``: splitting models at a layer, the stitching transform, the stitched network, the least-squares
  statistics and the training targets;
- ``init``: the transform's initialisations and masks, and ``initialise``, the one way a stitch is initialised;
- ``pair``: one stitch of a layer pair (``build_stitch``) and what the frozen models give on a split (``Views``);
- ``evaluate``: the figures of a stitched network on a split;
- ``stage``: the stitch stage (``stitch.py`` at the top of the repository);
- ``api``: this system's part of the Python API (``stitch_models``).
"""
