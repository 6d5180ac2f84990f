"""What both drop-in layers share: an MoELayer inside, and state dicts in the peer's format converted on load."""

from __future__ import annotations

from torch import nn

from ..layer import MoEAux, MoELayer
from .weights import PeerWeights, load_peer_weights


class DropInLayer(nn.Module):
    """A peer's layer running on ``self.moe``. Subclasses name the peer's gate key, which keys of a state dict are
    the peer's (``peer_keys``), and how to read them by global expert id (``peer_weights``)."""

    GATE_KEY: str
    moe: MoELayer
    last_aux: MoEAux | None

    def peer_keys(self, state_dict: dict, prefix: str) -> list[str]:
        raise NotImplementedError

    def peer_weights(self, state_dicts, prefix: str = "") -> PeerWeights:
        raise NotImplementedError

    def load_peer_state_dicts(self, state_dicts, prefix: str = "") -> None:
        """Gate and experts from the peer's state dicts: one holding every expert, or each rank's in rank order."""
        load_peer_weights(self.moe, self.peer_weights(state_dicts, prefix))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        """A dict in the peer's format is converted to ours in place (its keys replaced by ``moe.*``, whose child
        module then loads them as usual); a dict in our own format loads unchanged."""
        if prefix + self.GATE_KEY in state_dict:
            theirs = {k: state_dict.pop(k) for k in self.peer_keys(state_dict, prefix)}
            self.load_peer_state_dicts(theirs, prefix)
            state_dict.update(self.moe.state_dict(prefix=prefix + "moe."))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
