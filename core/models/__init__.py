"""Model registry entries live in submodules; ``core.registry.MODELS`` holds them.

A model builder is ``build(info, *, key=default, ...)`` where ``info`` is the dataset's ``DataBundle.info``
(``input_shape``, ``num_classes``, ``vocab_size``, ...) and the keyword-only parameters are the config's keys.
"""
