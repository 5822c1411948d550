"""Knowledge-update metrics with EasyEdit semantics: Reliability, Generality, Locality.

All three are the same score over different token sequences: per record, the fraction of target
tokens where the teacher-forced argmax equals the reference, averaged over records.

- Reliability: predictions after ``prompt + " " + target_new``, references = target_new's tokens.
- Generality: the same after the rephrased prompt.
- Locality: predictions of the edited model after ``locality_prompt + " " + locality_ground_truth``,
  references = the *unedited* model's predictions there (agreement, not gold accuracy).

``ivtrainer.evaluation.edit_metrics.evaluate_edits`` runs the forwards and computes all three.
"""

import datasets
import evaluate

from ivtrainer.evaluation.edit_metrics import score_tokens

_CITATION = """\
@inproceedings{wang2024easyedit,
  title={EasyEdit: An Easy-to-use Knowledge Editing Framework for Large Language Models},
  author={Wang, Peng and Zhang, Ningyu and others},
  booktitle={ACL (System Demonstrations)},
  year={2024}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of token-id lists, the teacher-forced argmax at each target position.
    references: list of token-id lists of the same lengths (target tokens, or the unedited
        model's predictions for Locality).
    kinds: optional list of names, one per record ("reliability", "generality", "locality"):
        one score per name is returned. Without it, one "score".
Returns:
    dict of mean per-record token agreement in [0, 1].
Example:
    >>> metric = evaluate.load(ivtrainer.evaluation.metrics.path("knowledge_update"))
    >>> metric.compute(predictions=[[1, 2], [3]], references=[[1, 5], [3]])
    {'score': 0.75}
"""


@evaluate.utils.file_utils.add_start_docstrings(__doc__, _KWARGS_DESCRIPTION)
class KnowledgeUpdate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, predictions, references, kinds=None):
        return score_tokens(predictions, references, kinds)
