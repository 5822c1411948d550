"""``ivtrainer.callbacks``: TrainerCallbacks usable on an unmodified ``Trainer`` or ``SFTTrainer``.

Planned: ``IVInterventionCallback`` (anneals and applies an instruction vector during training)
and ``IVKLCallback`` (adds the KL term towards the IV-intervened original model).
"""

__all__: list[str] = []
