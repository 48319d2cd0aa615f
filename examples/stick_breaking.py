"""Stick-breaking attention (Tan et al. 2024, "Scaling Stick-Breaking Attention"): each key breaks off a share
of what the keys nearer to the query have left, and no normaliser is needed.

β[m, n] = σ(scale·q[m]·k[n]); for n < m the weight is β[m, n]·Π_{n<j<m} (1 − β[m, j]), written in log space as
β[m, n]·exp(Σ_{n<j<m} log σ(−scale·q[m]·k[j])); O = Σ_n weight·v. The first query sees no key (its row is 0).
Positions count from the first query, which is right when M = N.

Not lowered yet: the tail sums over j, a second rank as long as the keys, inside each score; a program would
hold all of j beside its rows (BLOCK_M·N values), where the kernel needs a third tile rank streamed like n.
`explain()` and the call say so; the reference executor runs it (backend='reference').
"""

import einflash as ef


@ef.attention
def stick_breaking(q, k, v):
    j = ef.rank("j", ef.N)
    breaks = q @ k[j, ef.rank("e")] * ef.scale  # the scores again, at keys j
    tail = ef.where((ef.n < j) & (j < ef.m), ef.log(ef.sigmoid(-breaks)), 0).sum("j")
    return ef.where(ef.n < ef.m, ef.sigmoid(q @ k * ef.scale) * ef.exp(tail), 0) @ v
