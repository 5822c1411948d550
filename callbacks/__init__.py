"""``ivtrainer.callbacks``: TrainerCallbacks usable on an unmodified ``Trainer`` or ``SFTTrainer``.

- :class:`IVInterventionCallback` adds instruction vectors to the model being trained, with a
  strength annealed to zero (progressive IV intervention);
- :class:`IVKLCallback` adds the KL term towards the IV-intervened original model;
- :class:`ForgettingMonitorCallback` logs the KL between the model before training and now on a fixed
  sample of the training rows (what "RL's Razor" reports as predicting forgetting);
- :class:`TaskIVCallback` captures the IV of the task just trained, on the trained model (for IV
  repair at inference);
- :class:`LMEvalCallback` runs lm-evaluation-harness on the model being trained (``[eval]`` extra).
"""

from ivtrainer.callbacks.forgetting_monitor import ForgettingMonitorCallback
from ivtrainer.callbacks.iv_intervention import IVCallback, IVInterventionCallback
from ivtrainer.callbacks.iv_kl import IVKLCallback
from ivtrainer.callbacks.lm_evaluation import LMEvalCallback
from ivtrainer.callbacks.task_iv import TaskIVCallback

__all__ = [
    "ForgettingMonitorCallback",
    "IVCallback",
    "IVInterventionCallback",
    "IVKLCallback",
    "LMEvalCallback",
    "TaskIVCallback",
]
