"""The partitioner: a pure function from GraphIR × node capabilities × constraints to a Plan.

Search, in three steps, all scored in the end by the exact cost model (``scheduler.cost.evaluate``):

1. *Linearise* the DAG in two topological orders: the model's own, and a depth-first one that keeps
   each branch contiguous (so parallel branches — one camera input each — can become stages of their
   own).
2. *Dynamic programming over cuts* of each order (Neurosurgeon/PipeEdge style, generalised): the state
   is how many nodes of each node class are used plus the class of the last stage, so every node hosts
   at most one stage; the objective is summed (latency) or maxed (throughput).  Large graphs are cut
   only at a bounded set of candidate positions: where little data crosses, where op support changes,
   around pinned ops.
3. *Local search* on the exact cost model: move single ops, swap or move whole stages between nodes,
   until nothing improves.  This is what finds plans where branches on different nodes run in
   parallel, which a chain model cannot see.

Deterministic: no randomness, ties broken by fixed keys; the same inputs give the same Plan.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from meshai.capabilities import NodeCapability
from meshai.errors import PlanError
from meshai.plan import Constraints, Plan, Predicted, Stage
from scheduler.cost import INF, PRECISION_SCALE, CostContext, Evaluation, build_context
from scheduler.graph import GraphIR

#: Upper bound on DP states (node-class usage vectors).
MAX_STATES = 1024
#: Work budget of the cut DP: candidate cuts M are chosen so that M²/2 · states · classes stays below it.
DP_BUDGET = 6e6
#: Most candidate cut positions per order (more only refine an already fine grid).
MAX_CUTS = 64
#: Exact evaluations the local search may spend.
LOCAL_SEARCH_EVALS = 3000
#: Graphs up to this many ops get more linearisations.
SMALL_GRAPH_OPS = 64
#: Kernighan–Lin passes run on graphs up to this many ops.
KL_MAX_OPS = 16
#: Tiny graphs (ops × nodes at most this) also get a few seeded random restarts.
RESTART_LIMIT = 24
RESTARTS = 6
#: Local search runs while ops × nodes is at most this.
LOCAL_SEARCH_LIMIT = 400
#: Pair moves are tried while ops × nodes is at most this.
PAIR_MOVES_LIMIT = 40


@dataclass(frozen=True, slots=True)
class _Classes:
    """Nodes grouped into interchangeable classes (same profile, same speed, not pinned)."""

    members: tuple[tuple[int, ...], ...]  # class -> node indices (name order)
    of_node: tuple[int, ...]


def _classes(ctx: CostContext, usable: Sequence[int]) -> _Classes:
    pinned = {int(d) for d in ctx.forced if d >= 0}
    keys: dict[str, list[int]] = {}
    for d in usable:
        n = ctx.nodes[d]
        key = json.dumps(
            [
                n.profile.to_dict(),
                ctx.constraints.speed.get(n.name, 1.0),
                ctx.precision[d],
                n.name if d in pinned else "",
            ],
            sort_keys=True,
        )
        keys.setdefault(key, []).append(d)
    members = tuple(tuple(v) for v in keys.values())
    of_node = [-1] * ctx.n_nodes
    for c, m in enumerate(members):
        for d in m:
            of_node[d] = c
    return _Classes(members, tuple(of_node))


def _edges(graph: GraphIR) -> tuple[list[set[int]], list[set[int]]]:
    n = len(graph.ops)
    preds: list[set[int]] = [set() for _ in range(n)]
    succs: list[set[int]] = [set() for _ in range(n)]
    for p, op in enumerate(graph.ops):
        for t in op.inputs:
            q = graph.producer.get(t)
            if q is not None and q != p:
                preds[p].add(q)
                succs[q].add(p)
    return preds, succs


def _kahn(
    preds: Sequence[set[int]], succs: Sequence[set[int]], lifo: bool, low_first: bool = True
) -> list[int]:
    """Kahn's topological sort; LIFO follows one branch to its end, FIFO goes level by level.

    ``low_first`` breaks ties by the lowest op position, else by the highest.
    """
    n = len(preds)
    indeg = [len(s) for s in preds]
    flip = lifo == low_first  # the end we pop from must hold the preferred op
    ready = sorted((p for p in range(n) if indeg[p] == 0), reverse=flip)
    order: list[int] = []
    while ready:
        p = ready.pop() if lifo else ready.pop(0)
        order.append(p)
        new = []
        for s in succs[p]:
            indeg[s] -= 1
            if indeg[s] == 0:
                new.append(s)
        if lifo:
            ready.extend(sorted(new, reverse=flip))
        else:
            ready = sorted(ready + new, reverse=flip)
    return order


def dfs_order(graph: GraphIR) -> list[int]:
    """A topological order that finishes a branch before starting the next (LIFO Kahn)."""
    preds, succs = _edges(graph)
    return _kahn(preds, succs, lifo=True)


def linearisations(graph: GraphIR) -> list[list[int]]:
    """Distinct topological orders the cut DP tries: model order, depth-first, and as-late-as-possible."""
    preds, succs = _edges(graph)
    orders = [
        list(range(len(graph.ops))),
        _kahn(preds, succs, lifo=True),
        _kahn(succs, preds, lifo=True)[::-1],
        _kahn(succs, preds, lifo=False)[::-1],
    ]
    if len(graph.ops) <= SMALL_GRAPH_OPS:  # small graphs: branches in the other order too
        orders += [
            _kahn(preds, succs, lifo=True, low_first=False),
            _kahn(succs, preds, lifo=True, low_first=False)[::-1],
        ]
    out: list[list[int]] = []
    for o in orders:
        if o not in out:
            out.append(o)
    return out


def list_schedule(ctx: CostContext, usable: Sequence[int]) -> list[int]:
    """HEFT-like seed: each op, in topological order, on the node where it would finish first."""
    g = ctx.graph
    finish = [0.0] * ctx.n_ops
    free = dict.fromkeys(usable, 0.0)
    where = [usable[0]] * ctx.n_ops
    for p, op in enumerate(g.ops):
        best_t, best_d = INF, usable[0]
        for d in usable:
            t_op = ctx.op_s[p, d]
            if not math.isfinite(t_op) or (ctx.forced[p] >= 0 and ctx.forced[p] != d):
                continue
            ready = free[d]
            for t in op.inputs:
                q = g.producer.get(t)
                if q is not None:
                    ready = max(ready, finish[q] + ctx.link_s(g.nbytes(t), where[q], d))
                elif t in g.inputs:
                    ready = max(ready, ctx.link_s(g.nbytes(t), -1, d))
            if ready + t_op < best_t:
                best_t, best_d = ready + t_op, d
        where[p] = best_d
        finish[p] = best_t
        free[best_d] = best_t
    return where


def _crossing_bytes(graph: GraphIR, order: Sequence[int]) -> np.ndarray:
    """cross[q] = bytes of activations produced before position q and read at or after it."""
    n = len(order)
    where = np.empty(n, dtype=np.int64)
    where[np.asarray(order, dtype=np.int64)] = np.arange(n)
    diff = np.zeros(n + 2)
    for p, op in enumerate(graph.ops):
        for t in op.outputs:
            cons = graph.consumers.get(t, ())
            if not cons:
                continue
            a = int(where[p])
            b = max(int(where[c]) for c in cons)
            if b > a:
                diff[a + 1] += graph.nbytes(t)
                diff[b + 1] -= graph.nbytes(t)
    return np.cumsum(diff)[: n + 1]


def _candidate_cuts(
    ctx: CostContext, order: Sequence[int], cross: np.ndarray, m: int, classes: _Classes
) -> list[int]:
    """Cut positions 0 < q < N the DP may use: all of them for small graphs, else a spread of cheap ones."""
    n = len(order)
    if n - 1 <= m:
        return list(range(1, n))
    must: set[int] = set()
    sup = np.isfinite(ctx.op_s[np.asarray(order)])
    for q in range(1, n):
        if not np.array_equal(sup[q - 1], sup[q]):
            must.update((q,))
        if ctx.forced[order[q]] != ctx.forced[order[q - 1]]:
            must.add(q)
    must = set(sorted(must)[: m // 2])
    flops = np.array([ctx.graph.ops[p].flops for p in order]) + 1.0
    cum = np.cumsum(flops)
    total = cum[-1]
    windows = max(1, m - len(must))
    chosen = set(must)
    edges = np.searchsorted(cum, np.linspace(0, total, windows + 1)[1:-1])
    lo = 1
    for e in [*edges.tolist(), n]:
        hi = max(lo + 1, min(int(e), n))
        seg = cross[lo:hi]
        if len(seg):
            chosen.add(lo + int(np.argmin(seg)))
        lo = hi
    chosen.update(q for q in (1, 2, n - 2, n - 1) if 0 < q < n)  # tiny first/last stages
    chosen.discard(0)
    chosen.discard(n)
    _ = classes
    return sorted(chosen)


def _chain_dp(
    ctx: CostContext, order: Sequence[int], classes: _Classes, objective: str, stages: int | None
) -> list[list[int]]:
    """Best assignments (one per stage count) of contiguous segments of ``order`` to node classes."""
    g = ctx.graph
    n = len(order)
    n_cls = len(classes.members)
    counts = [len(m) for m in classes.members]
    # bound the state space: fewer nodes of the largest classes if needed
    while math.prod(c + 1 for c in counts) > MAX_STATES:
        big = max(range(n_cls), key=lambda c: counts[c])
        counts[big] -= 1
    radix = [math.prod(c + 1 for c in counts[:k]) for k in range(n_cls)]
    n_states = math.prod(c + 1 for c in counts)
    states = np.arange(n_states)
    cnt = np.stack([(states // radix[c]) % (counts[c] + 1) for c in range(n_cls)], axis=1)
    total = cnt.sum(axis=1)
    nxt = np.where(cnt < np.array(counts), states[:, None] + np.array(radix)[None, :], -1)

    rep = [m[0] for m in classes.members]
    perm = np.asarray(order)
    t_ord = ctx.op_s[perm][:, rep]  # (n, C)
    bad = ~np.isfinite(t_ord)
    forced = ctx.forced[perm]
    forced_cls = np.array([classes.of_node[int(f)] if f >= 0 else -1 for f in forced])
    bad |= (forced_cls[:, None] >= 0) & (forced_cls[:, None] != np.arange(n_cls)[None, :])
    t_ord = np.where(bad, 0.0, t_ord)
    pt = np.vstack([np.zeros((1, n_cls)), np.cumsum(t_ord, axis=0)])
    pbad = np.vstack([np.zeros((1, n_cls)), np.cumsum(bad, axis=0)])
    scale = np.array([PRECISION_SCALE.get(ctx.precision[r] or "fp32", 1.0) for r in rep])
    pparam = np.concatenate([[0.0], np.cumsum(ctx.op_param_bytes[perm])])
    act = np.array([g.ops[p].act_bytes for p in order], dtype=float)
    mem_cap = np.array([ctx.nodes[r].profile.memory_bytes for r in rep], dtype=float)
    cross = _crossing_bytes(g, order)

    m_budget = int(math.sqrt(2 * DP_BUDGET / max(1, n_states * n_cls)))
    cuts = _candidate_cuts(ctx, order, cross, max(8, min(MAX_CUTS, m_budget)), classes)
    bounds = [0, *cuts, n]
    nb = len(bounds)

    # segment cost seg[i, j, c] for [bounds[i], bounds[j])
    seg = np.full((nb, nb, n_cls), INF)
    b_arr = np.asarray(bounds)
    for i in range(nb - 1):
        a = bounds[i]
        run_max = np.maximum.accumulate(act[a:])
        bs = b_arr[i + 1 :]
        ok = (pbad[bs] - pbad[a]) == 0
        mem = (pparam[bs] - pparam[a])[:, None] * scale[None, :] + cross[a] + run_max[bs - a - 1][:, None]
        ok &= mem <= mem_cap[None, :]
        seg[i, i + 1 :] = np.where(ok, pt[bs] - pt[a], INF)

    links = [ctx.nodes[r].profile.link for r in rep]
    in_bytes = sum(g.nbytes(t) for t in g.inputs if t not in ctx.constraints.pins)
    out_bytes = sum(g.nbytes(t) for t in g.outputs)
    cin = np.array([ctx.caller.transfer_s(in_bytes, lk) for lk in links])
    cout = np.array([lk.transfer_s(out_bytes, ctx.caller) for lk in links])
    is_sum = objective != "throughput"

    def combine(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        out: np.ndarray = x + y if is_sum else np.maximum(x, y)
        return out

    def link_matrix(nbytes: float) -> np.ndarray:
        return np.array([[a.transfer_s(nbytes, b) for b in links] for a in links])

    dp = np.full((nb, n_states, n_cls), INF)
    arg_i = np.full((nb, n_states, n_cls), -1, dtype=np.int32)
    arg_c = np.full((nb, n_states, n_cls), -1, dtype=np.int32)
    best_prev = np.full((nb, n_states, n_cls), INF)
    best_prev_c = np.full((nb, n_states, n_cls), -1, dtype=np.int32)
    best_prev[0, 0, :] = cin
    for j in range(1, nb):
        stack = combine(best_prev[:j], seg[:j, j][:, None, :])
        ai = np.argmin(stack, axis=0)
        val = np.take_along_axis(stack, ai[None], axis=0)[0]
        for c in range(n_cls):
            valid = nxt[:, c] >= 0
            tgt = nxt[valid, c]
            src = states[valid]
            dp[j, tgt, c] = val[src, c]
            arg_i[j, tgt, c] = ai[src, c]
            arg_c[j, tgt, c] = best_prev_c[ai[src, c], src, c]
        if j < nb - 1:
            lm = link_matrix(float(cross[bounds[j]]))  # (C', C)
            cand = combine(dp[j][:, :, None], lm[None, :, :])  # (S, C', C)
            best_prev_c[j] = np.argmin(cand, axis=1)
            best_prev[j] = np.min(cand, axis=1)

    final = combine(dp[nb - 1], cout[None, :])
    results: list[list[int]] = []
    wanted = [stages] if stages is not None else sorted(set(total.tolist()) - {0})
    for k in wanted:
        mask = total == k
        if not mask.any():
            continue
        sub = np.where(mask[:, None], final, INF)
        flat = int(np.argmin(sub))
        s, c = divmod(flat, n_cls)
        if not math.isfinite(sub[s, c]):
            continue
        segs: list[tuple[int, int, int]] = []
        j = nb - 1
        while j > 0:
            i = int(arg_i[j, s, c])
            pc = int(arg_c[j, s, c])
            segs.append((bounds[i], bounds[j], c))
            s -= radix[c]
            j, c = i, pc
        segs.reverse()
        used = [0] * n_cls
        assign = [0] * n
        for a, b, cl in segs:
            node = classes.members[cl][used[cl]]
            used[cl] += 1
            for q in range(a, b):
                assign[order[q]] = node
        results.append(assign)
    return results


def _local_search(
    ctx: CostContext, start: list[int], objective: str, budget: int
) -> tuple[list[int], Evaluation]:
    """Improve an assignment by op moves and stage swaps/moves on the exact cost model."""
    best = list(start)
    best_ev = ctx.cached(best)
    usable = [d for d in range(ctx.n_nodes) if ctx.precision[d] is not None]
    evals = 0
    improved = True
    while improved and evals < budget:
        improved = False
        candidates: list[list[int]] = []
        used = sorted(set(best))
        for u in used:  # whole-stage moves and swaps
            for v in usable:
                if v == u:
                    continue
                cand = [v if d == u else (u if d == v else d) for d in best]
                candidates.append(cand)
        for p in range(ctx.n_ops):  # single-op moves, and moves of an op with the rest of its stage after it
            for d in usable:
                if d != best[p]:
                    cand = list(best)
                    cand[p] = d
                    candidates.append(cand)
                    tail = [d if (q >= p and best[q] == best[p]) else best[q] for q in range(ctx.n_ops)]
                    if tail != cand:
                        candidates.append(tail)
        if ctx.n_ops * len(usable) <= PAIR_MOVES_LIMIT:  # pairs of op moves, for small graphs
            for u in used:  # a whole stage moves to another node except one op that stays
                for v in usable:
                    if v == u:
                        continue
                    for p in range(ctx.n_ops):
                        if best[p] == u:
                            candidates.append([v if (d == u and q != p) else d for q, d in enumerate(best)])
            for p in range(ctx.n_ops):
                for q in range(p + 1, ctx.n_ops):
                    for dp_ in usable:
                        for dq in usable:
                            if dp_ != best[p] and dq != best[q]:
                                cand = list(best)
                                cand[p], cand[q] = dp_, dq
                                candidates.append(cand)
        for cand in candidates:
            if evals >= budget:
                break
            evals += 1
            ev = ctx.cached(cand)
            if ev.key(objective) < best_ev.key(objective):
                best, best_ev = cand, ev
                improved = True
    return best, best_ev


def _relaxed_key(ev: Evaluation, objective: str) -> tuple[float, ...]:
    """Throughput moves ranked by resource loads first, feasibility second (a cycle may be passed through)."""
    if objective == "throughput":
        return (*ev.loads, float(ev.violations if not ev.feasible else 0))
    return ev.key(objective)


def _kl_pass(
    ctx: CostContext,
    start: list[int],
    start_ev: Evaluation,
    usable: Sequence[int],
    objective: str,
    relaxed: bool = False,
) -> tuple[list[int], Evaluation]:
    """One Kernighan–Lin pass: take the best single-op move N times, even uphill, each op once;
    return the best assignment seen.  Finds improvements that need several ops to move together."""
    cur = list(start)
    best, best_ev = list(start), start_ev
    locked: set[int] = set()
    for _ in range(ctx.n_ops):
        move: tuple[tuple[float, ...], int, int, Evaluation] | None = None
        for p in range(ctx.n_ops):
            if p in locked:
                continue
            for d in usable:
                if d == cur[p]:
                    continue
                cand = list(cur)
                cand[p] = d
                ev = ctx.cached(cand)
                k = _relaxed_key(ev, objective) if relaxed else ev.key(objective)
                if move is None or k < move[0]:
                    move = (k, p, d, ev)
        if move is None:
            break
        _, p, d, ev = move
        cur[p] = d
        locked.add(p)
        if ev.key(objective) < best_ev.key(objective):
            best, best_ev = list(cur), ev
    return best, best_ev


def _refine(
    ctx: CostContext, start: list[int], usable: Sequence[int], objective: str
) -> tuple[list[int], Evaluation]:
    """Local search, then Kernighan–Lin passes (small graphs), alternating until neither improves."""
    best, best_ev = _local_search(ctx, start, objective, LOCAL_SEARCH_EVALS)
    if ctx.n_ops > KL_MAX_OPS:
        return best, best_ev
    while True:
        cand, cev = _kl_pass(ctx, best, best_ev, usable, objective)
        if not cev.key(objective) < best_ev.key(objective) and objective == "throughput":
            cand, cev = _kl_pass(ctx, best, best_ev, usable, objective, relaxed=True)
        if not cev.key(objective) < best_ev.key(objective):
            return best, best_ev
        best, best_ev = _local_search(ctx, cand, objective, LOCAL_SEARCH_EVALS)


def _restarts(
    ctx: CostContext, best: list[int], best_ev: Evaluation, usable: Sequence[int], objective: str
) -> tuple[list[int], Evaluation]:
    """Refine from a few pseudo-random starts, seeded by the problem itself (so still deterministic)."""
    rng = np.random.default_rng(RESTARTS * ctx.n_ops + len(usable))
    for _ in range(RESTARTS):
        start = [usable[int(i)] for i in rng.integers(0, len(usable), ctx.n_ops)]
        cand, cev = _refine(ctx, start, usable, objective)
        if cev.key(objective) < best_ev.key(objective):
            best, best_ev = cand, cev
    return best, best_ev


def _int8_hint(constraints: Constraints) -> str:
    """Why there is no int8 variant: none was built, or the accuracy budget rules it out."""
    if constraints.int8_blocked:
        return f"int8 is blocked by {constraints.int8_blocked}"
    if "int8" in constraints.precisions:
        return "the int8 variant exists"
    return "an int8-only node needs a quantized variant (--calibration)"


def _explain_infeasible(ctx: CostContext, usable: Sequence[int], last_reason: str) -> str:
    """Name the op, node and limit that make every plan impossible."""
    g = ctx.graph
    names = [n.name for n in ctx.nodes]
    k = ctx.constraints.stages
    if k is not None and k > len(usable):
        skipped = [
            f"{names[d]} ({ctx.nodes[d].kind}) runs only {', '.join(ctx.nodes[d].profile.precisions)}"
            for d in range(ctx.n_nodes)
            if d not in usable
        ]
        more = ""
        if skipped:
            more = (
                f"; excluded: {'; '.join(skipped)}, and the model exists only as "
                f"{', '.join(ctx.constraints.precisions)} ({_int8_hint(ctx.constraints)})"
            )
        return (
            f"--stages {k} needs {k} nodes that can run the model, but only {len(usable)} can"
            f" ({', '.join(names[d] for d in usable) or 'none'}){more}"
        )
    if k is not None and k > len(g.ops):
        return f"--stages {k} asks for more stages than the model has compute ops ({len(g.ops)})"
    for p, op in enumerate(g.ops):
        need = int(ctx.op_param_bytes[p]) + op.act_bytes
        if all(need > ctx.nodes[d].profile.memory_bytes for d in usable):
            caps = ", ".join(f"{names[d]} has {ctx.nodes[d].profile.memory_bytes}" for d in usable)
            return f"op {op.name!r} ({op.op_type}) needs {need} bytes of memory; no node has enough ({caps})"
    what = f"exactly {k} stages" if k is not None else "stages"
    tail = f"; the best attempt failed because {last_reason}" if last_reason else ""
    return (
        f"the model cannot be split into {what} on these nodes within their memory, op support and pins{tail}"
    )


def plan(graph: GraphIR, nodes: Sequence[NodeCapability], constraints: Constraints | None = None) -> Plan:
    """Partition ``graph`` over ``nodes``; the same inputs always give the same Plan.

    With an int8 variant and its measured accuracy cost in ``constraints`` (``int8_drop_pts``),
    precision is chosen together with placement (``scheduler.precision``).  Raises PlanError naming
    the op, node or limit when no plan satisfies the constraints.
    """
    constraints = constraints or Constraints()
    if constraints.int8_drop_pts is not None:
        from scheduler.precision import plan_mixed

        return plan_mixed(graph, nodes, constraints)
    ctx = build_context(graph, nodes, constraints)
    return plan_from_evaluation(ctx, search(ctx), [n.name for n in nodes])


def search(ctx: CostContext) -> Evaluation:
    """The best feasible assignment for one cost context (fixed precisions); PlanError if none."""
    graph, nodes, constraints = ctx.graph, ctx.nodes, ctx.constraints
    usable = [d for d in range(len(nodes)) if ctx.precision[d] is not None]
    if not usable:
        parts = [f"{n.name} ({n.kind}) runs only {', '.join(n.profile.precisions)}" for n in nodes]
        raise PlanError(
            f"no node can run any variant of the model (variants: {', '.join(constraints.precisions)}): "
            f"{'; '.join(parts)}; {_int8_hint(constraints)}"
        )
    for p, op in enumerate(graph.ops):
        if not np.isfinite(ctx.op_s[p]).any():
            why = []
            for d, n in enumerate(nodes):
                if ctx.precision[d] is None:
                    why.append(f"{n.name} ({n.kind}) runs only {', '.join(n.profile.precisions)}")
                else:
                    why.append(f"{n.name} ({n.kind}) does not support {op.op_type}")
            raise PlanError(f"op {op.name!r} ({op.op_type}) can run on no node: {'; '.join(why)}")
    for p in range(len(graph.ops)):
        f = int(ctx.forced[p])
        if f >= 0 and not math.isfinite(ctx.op_s[p, f]):
            n = nodes[f]
            reason = (
                f"runs only {', '.join(n.profile.precisions)}"
                if ctx.precision[f] is None
                else f"does not support {graph.ops[p].op_type}"
            )
            raise PlanError(f"op {graph.ops[p].name!r} reads an input pinned to {n.name!r}, which {reason}")

    objective = constraints.objective
    classes = _classes(ctx, usable)
    seeds: list[list[int]] = []
    for order in linearisations(graph):
        for a in _chain_dp(ctx, order, classes, objective, constraints.stages):
            if a not in seeds:
                seeds.append(a)
    heft = list_schedule(ctx, usable)
    if heft not in seeds:
        seeds.append(heft)
    if not seeds:
        raise PlanError(_explain_infeasible(ctx, usable, ""))
    scored = sorted(((ctx.cached(a), a) for a in seeds), key=lambda ea: ea[0].key(objective))
    best_ev, best = scored[0]
    if len(graph.ops) * len(usable) <= LOCAL_SEARCH_LIMIT:
        starts = scored if len(graph.ops) * len(usable) <= PAIR_MOVES_LIMIT else scored[:3]
        for _ev, a in starts:
            cand, cev = _refine(ctx, a, usable, objective)
            if cev.key(objective) < best_ev.key(objective):
                best, best_ev = cand, cev
        if len(graph.ops) * len(usable) <= RESTART_LIMIT:
            best, best_ev = _restarts(ctx, best, best_ev, usable, objective)
    if not best_ev.feasible:
        raise PlanError(_explain_infeasible(ctx, usable, best_ev.reason))
    return best_ev


def plan_from_evaluation(ctx: CostContext, ev: Evaluation, names: Sequence[str] | None = None) -> Plan:
    """Turn a feasible Evaluation into Plan data."""
    g = ctx.graph
    names = names or [n.name for n in ctx.nodes]
    stages = []
    for i, s in enumerate(ev.stages):
        node = ctx.nodes[s.device]
        stages.append(
            Stage(
                id=i,
                node=names[s.device],
                accelerator=node.kind,
                precision=ctx.precision[s.device] or "fp32",
                ops=tuple(g.ops[p].name for p in s.ops),
                inputs=s.inputs,
                outputs=s.outputs,
                routes=dict(s.routes),
                const_ops=s.const_ops,
                predicted_ms=round(ev.stage_s[i] * 1e3, 6),
                param_bytes=ev.stage_param[i],
                memory_bytes=ev.stage_mem[i],
                bytes_out=ev.stage_bytes_out[i],
            )
        )
    return Plan(
        objective=ctx.constraints.objective,
        stages=tuple(stages),
        predicted=Predicted(
            latency_ms=round(ev.latency_s * 1e3, 6),
            bottleneck_ms=round(ev.bottleneck_s * 1e3, 6),
            transfer_bytes=ev.transfer_bytes,
            energy_mj=round(ev.energy_j * 1e3, 6),
        ),
        model=g.name,
        inputs=g.inputs,
        outputs=g.outputs,
        pins=dict(ctx.constraints.pins),
    )
