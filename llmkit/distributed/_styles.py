"""``ColwiseParallel`` / ``RowwiseParallel`` for :class:`llmkit.nn.Int8Linear`.

torch's styles partition only ``nn.Linear`` and ``nn.Embedding`` parameters; an
``Int8Linear`` keeps its int8 weight and float32 scales in buffers. These styles shard
them the same way (column-wise: weight, ``weight_scale`` and bias ``Shard(0)``; row-wise:
weight ``Shard(1)``, scales and bias replicated) and convert the inputs and outputs as
torch's styles do, so a tensor-parallel plan written for ``nn.Linear`` works on a model
that :func:`llmkit.quantize` converted. The op then runs on the local shards through its
DTensor sharding strategy (:mod:`llmkit.distributed._strategies`): row-wise, W8A16
layers without activation give partial sums reduced into ``output_layouts``; W8A8 (whose
per-row activation scale needs the whole input row) and fused activations are gathered
by DTensor first (correct, and as costly as a replicated layer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

if TYPE_CHECKING:  # at run time imported lazily, by _int8_linear_class
    from ..nn import Int8Linear

__all__ = ["Int8ColwiseParallel", "Int8RowwiseParallel"]


def _int8_linear_class() -> type[Int8Linear]:
    from ..nn import Int8Linear

    return Int8Linear


class _Int8Parallel(ParallelStyle):
    weight_dim: int = 0
    scales_sharded: bool = True
    default_input: Placement = Replicate()
    default_output: Placement = Shard(-1)
    desired_input: Placement = Replicate()

    def __init__(
        self,
        *,
        input_layouts: Placement | None = None,
        output_layouts: Placement | None = None,
        use_local_output: bool = True,
    ) -> None:
        super().__init__()
        self.input_layouts = (input_layouts or self.default_input,)
        self.output_layouts = (output_layouts or self.default_output,)
        self.use_local_output = use_local_output

    def _partition(self, name: str, module: nn.Module, mesh: Any) -> None:
        if not isinstance(module, _int8_linear_class()):
            return
        shard_w = [Shard(self.weight_dim)]
        per_channel = [Shard(0)] if self.scales_sharded else [Replicate()]
        module.register_buffer("weight", distribute_tensor(module.weight, mesh, shard_w))
        module.register_buffer("weight_scale", distribute_tensor(module.weight_scale, mesh, per_channel))
        if module.bias is not None:
            bias = distribute_tensor(module.bias.detach(), mesh, per_channel)
            module.bias = nn.Parameter(bias, requires_grad=False)

    def _input(self, module: nn.Module, inputs: tuple, mesh: Any) -> tuple:
        x = inputs[0]
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, self.input_layouts, run_check=False)
        return (_placed(x, (self.desired_input,)), *inputs[1:])

    def _output(self, module: nn.Module, output: DTensor, mesh: Any) -> Any:
        output = _placed(output, self.output_layouts)
        return output.to_local() if self.use_local_output else output

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        cls = _int8_linear_class()
        if not isinstance(module, cls):
            raise TypeError(f"{type(self).__name__}: expected llmkit.nn.Int8Linear, got {type(module).__name__}")
        return distribute_module(
            module,
            device_mesh,
            self._partition,
            # torch types input_fn as returning None, but registers it as a forward pre-hook,
            # whose return value replaces the inputs
            lambda mod, inputs, mesh: self._input(mod, inputs, mesh),  # type: ignore[arg-type]
            lambda mod, output, mesh: self._output(mod, output, mesh),
        )


def _placed(t: DTensor, placements: tuple) -> DTensor:
    """``t`` redistributed to ``placements`` (negative shard dims allowed), if it is not already."""
    want = tuple(Shard(p.dim % t.ndim) if isinstance(p, Shard) else p for p in placements)
    return t if tuple(t.placements) == want else t.redistribute(placements=want)


class Int8ColwiseParallel(_Int8Parallel):
    """Shard an :class:`llmkit.nn.Int8Linear` column-wise, like ``ColwiseParallel``.

    Args (as ``ColwiseParallel``): ``input_layouts`` (default ``Replicate()``),
    ``output_layouts`` (default ``Shard(-1)``), ``use_local_output`` (default True).
    The weight, ``weight_scale`` and bias become ``Shard(0)`` DTensors.
    """


class Int8RowwiseParallel(_Int8Parallel):
    """Shard an :class:`llmkit.nn.Int8Linear` row-wise, like ``RowwiseParallel``.

    Args (as ``RowwiseParallel``): ``input_layouts`` (default ``Shard(-1)``),
    ``output_layouts`` (default ``Replicate()``), ``use_local_output`` (default True).
    The weight becomes ``Shard(1)``, ``weight_scale`` and bias replicated DTensors.
    """

    weight_dim = 1
    scales_sharded = False
    default_input = Shard(-1)
    default_output = Replicate()
    desired_input = Shard(-1)
