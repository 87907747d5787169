"""`duccio_fx.Choice`: a search point a model file declares itself.

    self.block = duccio_fx.Choice(conv3=nn.Sequential(...), dw=nn.Sequential(...), skip=nn.Identity())

Outside a path search (training the seed, `inspect`, the mask method) a Choice is its first alternative,
so the seed is the model with every Choice at its first alternative. The supernet-insertion pass of the
path method keeps each Choice as a search point over all its alternatives.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from duccio_fx.common.errors import DuccioError


class Choice(nn.Module):
    """Alternatives with the same input and output shapes; the first is the seed's (used outside the search)."""

    def __init__(self, *alternatives: nn.Module, **named: nn.Module) -> None:
        super().__init__()
        items = [(str(i), m) for i, m in enumerate(alternatives)] + list(named.items())
        if len(items) < 2:
            raise DuccioError(f"a Choice needs at least two alternatives, got {len(items)}", where="duccio_fx.Choice",
                              fix="pass the alternatives, e.g. Choice(conv3=..., dwsep=..., skip=nn.Identity())")
        for name, module in items:
            if not isinstance(module, nn.Module):
                raise DuccioError(f"alternative {name!r} of a Choice is a {type(module).__name__}, not an nn.Module",
                                  where="duccio_fx.Choice", fix="pass modules (e.g. nn.Sequential(...))")
            self.add_module(name, module)
        if isinstance(items[0][1], nn.Identity):
            raise DuccioError("the first alternative of a Choice is nn.Identity", where="duccio_fx.Choice",
                              fix="put a layer first: the first alternative is the seed's, and it must hold a layer "
                                  "so the pass can find the Choice in the traced graph")

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.named_children()]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return next(iter(self.children()))(*args, **kwargs)
