"""Intermediate tensors allocated once per loaded model instead of on every run (CPU targets).

TVM's memory planner (`StaticPlanBlockMemory`) shares a few storages between a model's intermediate
tensors, but the compiled `main` still allocates those storages and creates a tensor object in them for
every intermediate on every run: the bundled encoder's 35 such tensors cost about 3 us of its 12 us floor
at batch 1, more than all of its layer norms. This pass moves those allocations into a function of their
own, `WORKSPACE_FUNCTION`, which returns them (and the reshaped views of them that `main` reads, each
also a runtime call per run before); `main` takes them as parameters after the model's inputs.
`pruneaug.runtime.LoadedModel` calls it once at load and passes the tensors to every run, so two runs of
one loaded model must not overlap (it holds a lock). The model's outputs are not planned storage: they
stay fresh tensors on every run.

CUDA builds keep TVM's own answer to the same cost (the CUDA graph rewrite lifts and caches their
allocations), so only CPU artifacts have the function (`has_workspace`).
"""
from __future__ import annotations

from pruneaug.cost_model.targets import TargetProfile

WORKSPACE_FUNCTION = "workspace"


def has_workspace(target: TargetProfile) -> bool:
    """Whether an artifact built for `target` has `WORKSPACE_FUNCTION` and a `main` that takes its tensors."""
    return target.kind != "cuda"


def lift_workspace_pass():
    """The Relax module pass, to run right after `StaticPlanBlockMemory` (before the allocations are lowered
    to the VM's builtins)."""
    import tvm
    from tvm import ir, relax

    ops = {name: ir.Op.get(f"relax.memory.{name}") for name in ("alloc_storage", "alloc_tensor", "kill_storage",
                                                                 "kill_tensor")}
    ops["reshape"] = ir.Op.get("relax.reshape")

    def is_call(value, name: str) -> bool:
        return isinstance(value, relax.Call) and value.op.same_as(ops[name])

    @tvm.transform.module_pass(opt_level=0, name="PruneaugLiftWorkspace")
    def lift(mod, _ctx):
        main = mod["main"]
        storages, tensors, lifted, blocks, params = set(), [], [], [], []
        in_workspace: dict = {}  # a var of main holding a workspace tensor -> that tensor's var in `workspace`

        def take(binding, value) -> relax.VarBinding:
            """`binding`'s tensor made in `workspace` (as `value`) and a parameter of main in its place."""
            in_workspace[binding.var] = binding.var
            tensors.append(binding.var)
            lifted.append(relax.VarBinding(binding.var, value))
            param = relax.Var(f"{binding.var.name}_workspace", binding.var.ty)
            params.append(param)
            return relax.VarBinding(binding.var, param)  # an alias: the planned code is unchanged

        for block in main.body.blocks:
            kept = []
            for binding in block.bindings:
                value = binding.value
                if is_call(value, "alloc_storage"):
                    storages.add(binding.var)
                    lifted.append(binding)
                elif is_call(value, "alloc_tensor") and value.args[0] in storages:
                    kept.append(take(binding, value))
                elif is_call(value, "reshape") and value.args[0] in in_workspace:
                    # a view of a workspace tensor is made once too (each was a runtime call, ~0.1 us)
                    kept.append(take(binding, relax.op.reshape(in_workspace[value.args[0]], value.args[1])))
                elif isinstance(value, relax.Var) and value in in_workspace:
                    in_workspace[binding.var] = in_workspace[value]
                    kept.append(binding)
                elif not ((is_call(value, "kill_storage") or is_call(value, "kill_tensor"))
                          and (value.args[0] in storages or value.args[0] in in_workspace)):
                    kept.append(binding)
            blocks.append(relax.BindingBlock(kept))
        out = tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs)
        out["main"] = relax.Function(list(main.params) + params, relax.SeqExpr(blocks, main.body.body),
                                     main.ret_ty, main.is_pure, main.attrs)
        workspace = relax.Function([], relax.SeqExpr([relax.BindingBlock(lifted)], relax.Tuple(tensors)),
                                   relax.TupleType([tensor.ty for tensor in tensors]), True)
        out[WORKSPACE_FUNCTION] = workspace.with_attr("global_symbol", WORKSPACE_FUNCTION)
        return out

    return lift
