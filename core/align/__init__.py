"""Align: backprop-free learning rules and the input-weight alignment scores of weight updates.

- ``rules``: the learning rules (Align-zero, Align-ada, Align-prop, FA, DFA, last layer) as gradient providers of
  the training loop (the protocol and back-propagation live in ``instill.steps``);
- ``scores``: alignment scores of weight updates against the Align-zero baseline, exact or by Hutchinson probes;
- ``ntk``: the models the rules can tap (``ntk_mlp``, ``ntk_cnn``, ``add_rnn``);
- ``stage``: the align stage (``align.py``);
- ``api``: this system's part of the Python API (``learning_rule``, ``learning_rules``, ``alignment_scores``).
"""
