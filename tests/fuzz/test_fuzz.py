"""The fuzzer's fixed share: a derandomized run of random declarations (einflash.fuzz), each refused with a typed
einflash error or right against the float64 reference, the reference against plain torch, and the gradients
against autograd through plain torch. A long run with new seeds: ``python -m einflash.fuzz --minutes 30``."""

from hypothesis import HealthCheck, given, settings

from einflash.fuzz import Program, check, programs

EXAMPLES = 60  # about two minutes on two cores


@settings(
    max_examples=EXAMPLES, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
@given(programs())
def test_every_declaration_is_right_or_refused(program: Program):
    check(program)
