"""Contrastive losses, one per file: InfoNCE (eq. 1), CoSENT (eq. 2), Matryoshka wrapper.

One call shape: loss(a, b, labels, *options) -> (loss, detached scores), a and b unit-norm embeddings ((N, d) and
(M, d): queries and candidates for InfoNCE, the two sides of N pairs for CoSENT)."""

from conan.losses.cosent import cosent_loss
from conan.losses.gather import gather_with_grad
from conan.losses.infonce import infonce_loss, positive_copies_mask
from conan.losses.matryoshka import matryoshka_loss

__all__ = ["cosent_loss", "gather_with_grad", "infonce_loss", "matryoshka_loss", "positive_copies_mask"]
