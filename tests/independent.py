"""What the tests compare dpo_ds against: the two-model baseline's log-probs in float64 (full log_softmax, no
chunking, no layout), and one loss from its four log-prob tensors."""
import torch

from dpo_ds.data.encode import IGNORE
from dpo_ds.model.pair import Pair
from dpo_ds.objective.loss import pair_loss


def naive_sequence_logps(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """The two-model baseline's log-probs: full log_softmax over [B, T, V] in float64."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.double()
    logp = logits[:, :-1].log_softmax(-1)
    targets = labels[:, 1:]
    mask = targets != IGNORE
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(1)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0, chosen_tokens=None, rejected_tokens=None
             ) -> torch.Tensor:
    """One loss from its four [B] log-probs (token counts for the normalised ones) -> per-pair losses [B]."""
    if chosen_tokens is None:
        if loss_type in ("ipo", "sigmoid_norm", "sft"):
            raise ValueError(f"{loss_type} needs chosen_tokens and rejected_tokens to length-normalise")
        chosen_tokens = rejected_tokens = torch.ones_like(policy_chosen_logps)
    return pair_loss(loss_type, Pair.of(policy_chosen_logps, policy_rejected_logps, chosen_tokens, rejected_tokens),
                     Pair.of(ref_chosen_logps, ref_rejected_logps), beta, label_smoothing)
