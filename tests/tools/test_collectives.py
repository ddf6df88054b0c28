"""Collective bytes from HLO text: operand bytes × the ring factor × the trips of enclosing loops,
on hand-written modules in the forms that XLA:CPU, XLA:GPU and XLA:TPU print."""

import pytest

from lmhead_jax.tools import collectives

# An all-gather of bf16[4,128] over groups of 8 inside a loop of 6 trips (known_trip_count), and
# an all-reduce of f32[256] over all 8 devices outside it.
KNOWN_TRIPS = ("""HloModule jit_step, is_scheduled=true, num_partitions=8

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%cond (p: (s32[], bf16[4,128])) -> pred[] {
  %p = (s32[], bf16[4,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(6)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p.1: (s32[], bf16[4,128])) -> (s32[], bf16[4,128]) {
  %p.1 = (s32[], bf16[4,128]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %x = bf16[4,128]{1,0:T(8,128)(2,1)} get-tuple-element(%p.1), index=1
  %ag = bf16[32,128]{1,0} all-gather(%x), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}
  %one = s32[] constant(1)
  %next = s32[] add(%i.1, %one)
  %y = bf16[4,128]{1,0} slice(%ag), slice={[0:4], [0:128]}
  ROOT %t = (s32[], bf16[4,128]{1,0}) tuple(%next, %y)
}

ENTRY %main (x.2: bf16[4,128], z: f32[256]) -> (bf16[4,128], f32[256]) {
  %x.2 = bf16[4,128]{1,0} parameter(0)
  %z = f32[256]{0} parameter(1)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[4,128]{1,0}) tuple(%zero, %x.2)
  %w = (s32[], bf16[4,128]) while(%init), condition=%cond, body=%body, """
               """backend_config={"known_trip_count":{"n":"6"}}
  %r = bf16[4,128]{1,0} get-tuple-element(%w), index=1
  %ar = f32[256]{0} all-reduce(%z), channel_id=2, replica_groups={}, to_apply=%add
  ROOT %out = (bf16[4,128]{1,0}, f32[256]{0}) tuple(%r, %ar)
}
""")


def test_loop_body_counts_once_per_trip():
  sent = collectives.per_device(KNOWN_TRIPS)
  assert sent["all-gather"] == 6 * 7 * (4 * 128 * 2)  # (n − 1) · operand bytes, 6 trips
  assert sent["all-reduce"] == 2 * 7 / 8 * (256 * 4)  # replica_groups={}: all 8 devices
  assert sent["reduce-scatter"] == sent["all-to-all"] == sent["collective-permute"] == 0


def test_trip_count_from_the_condition_with_an_unrolled_step():
  """XLA:TPU prints no trip count and unrolls some loops by 2: `i < 16` stepping by 2 from 0."""
  text = (KNOWN_TRIPS.replace(', backend_config={"known_trip_count":{"n":"6"}}', "")
          .replace("constant(6)", "constant(16)").replace("%one = s32[] constant(1)",
                                                         "%one = s32[] constant(2)"))
  assert collectives.per_device(text)["all-gather"] == 8 * 7 * (4 * 128 * 2)
  started = text.replace("%zero = s32[] constant(0)", "%zero = s32[] constant(4)")
  assert collectives.per_device(started)["all-gather"] == 6 * 7 * (4 * 128 * 2)


@pytest.mark.parametrize("attrs,devices,n", [
    ("replica_groups={{0,1,2,3},{4,5,6,7}}", 8, 4),
    ("replica_groups=[4,2]<=[8]", 8, 2),
    ("replica_groups=[2,4]<=[4,2]T(1,0)", 8, 4),
    ("replica_groups=mesh['data'=2,'fsdp'=4,'tensor'=1] {'fsdp'}", 8, 4),
    ("replica_groups=mesh['data'=2,'fsdp'=4,'tensor'=2] {'data','tensor'}", 16, 4),
    ("replica_groups={}, use_global_device_ids=true", 32, 32),
])
def test_group_sizes(attrs, devices, n):
  assert collectives.group_size(attrs, devices) == n


def test_async_starts_tuples_conditionals_and_continued_lines():
  """A -start counts (its -done does not); a tuple operand's bytes add up; a conditional counts
  its costliest branch; an attribute string that spans lines stays one instruction."""
  text = """HloModule m, num_partitions=4

%small (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  ROOT %cp = f32[8]{0} collective-permute(%a), source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
}

%big (b: f32[8]) -> f32[8] {
  %b = f32[8]{0} parameter(0)
  %wide = f32[64]{0} broadcast(%b), dimensions={}
  %cp.1 = f32[64]{0} collective-permute(%wide), source_target_pairs={{0,1},{1,0}}
  ROOT %s = f32[8]{0} slice(%cp.1), slice={[0:8]}
}

ENTRY %main (p: f32[8], q: bf16[16,2], k: s32[]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  %q = bf16[16,2]{1,0} parameter(1)
  %k = s32[] parameter(2)
  %rs = (bf16[4,2], f32[2]) reduce-scatter(%q, %p), frontend_attributes={kernel_metadata={
"xprof": "{\\"block_q\\": 128}"
}}, replica_groups={{0,1,2,3}}, dimensions={0}
  %ars = f32[8]{0} all-reduce-start(%p), replica_groups={{0,1},{2,3}}
  %ard = f32[8]{0} all-reduce-done(%ars)
  %a2a = s32[] all-to-all(%k), replica_groups={{0,1,2,3}}
  ROOT %c = f32[8]{0} conditional(%k, %ard, %ard), branch_computations={%small, %big}
}, execution_thread="main"
"""
  sent = collectives.per_device(text)
  assert sent["reduce-scatter"] == pytest.approx(3 / 4 * (16 * 2 * 2 + 8 * 4))
  assert sent["all-reduce"] == pytest.approx(2 * 1 / 2 * 8 * 4)  # the start only, groups of 2
  assert sent["all-to-all"] == pytest.approx(3 / 4 * 4)
  assert sent["collective-permute"] == 64 * 4  # the big branch


def test_type_bytes():
  assert collectives.type_bytes("(bf16[2,3]{1,0:T(2,128)(2,1)S(1)}, f32[], pred[4])") == 12 + 4 + 4
  assert collectives.type_bytes("f8e4m3fn[10]{0}") == 10
  assert collectives.type_bytes("token[]") == 0


def test_a_loop_of_unknown_trips():
  """A convergence loop (`while not done`): ignored when it sends nothing, else counted once with
  a warning."""
  text = KNOWN_TRIPS.replace(', backend_config={"known_trip_count":{"n":"6"}}', "").replace(
      "ROOT %lt = pred[] compare(%i, %n), direction=LT", "ROOT %lt = pred[] is-finite(%i)")
  with pytest.warns(UserWarning, match="trip count of while loop %w is unknown"):
    assert collectives.per_device(text)["all-gather"] == 7 * (4 * 128 * 2)
  quiet = text.replace("%ag = bf16[32,128]{1,0} all-gather(%x)", "%ag = bf16[32,128]{1,0} pad(%x)")
  assert collectives.per_device(quiet)["all-gather"] == 0
