"""Bytes that each device sends in a compiled program's collectives, read from its HLO text.

`per_device(compiled.as_text())` walks the optimized HLO: every all-gather, reduce-scatter,
all-reduce, all-to-all and collective-permute (and their async `-start` forms) counts the bytes
one device sends under the ring algorithms, from its operands' bytes b and its group size n:
all-gather (n−1)·b, reduce-scatter and all-to-all (n−1)/n·b, all-reduce 2(n−1)/n·b,
collective-permute b. An op inside a while loop counts once per trip (the layer scan, the
micro-batch scan): the trip count comes from the loop's `known_trip_count` (XLA:CPU, XLA:GPU) or
else from its condition, `i < N` (XLA:TPU prints none); a loop of unknown trips that sends
anything counts once, with a warning. A conditional counts its costliest branch.
`costs.collective_bytes` is the analytic count under the same convention.
"""

import collections
import dataclasses
import math
import re
import warnings

# bytes a device sends per operand byte, in a group of n devices
SENT = {"all-gather": lambda n: n - 1, "reduce-scatter": lambda n: (n - 1) / n,
        "all-reduce": lambda n: 2 * (n - 1) / n, "all-to-all": lambda n: (n - 1) / n,
        "collective-permute": lambda n: 1.0}
KINDS = tuple(SENT)
_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
               "s4": 0.5, "u4": 0.5}
_ARRAY = re.compile(r"\b([a-z]\w*)\[([<=\d,]*)\]")
_NAME = re.compile(r"%([\w.\-]+)")
_HEADER = re.compile(r"(?:ENTRY\s+)?%([\w.\-]+)\s")
_END = re.compile(r"\}($|, \w+=)")  # a computation's last line (a continuation line: '}}, ...')
_START = re.compile(r"\s+(ROOT\s+)?%([\w.\-]+)\s*=\s*")  # an instruction's first line
_CALLEES = re.compile(r"\b(?:calls|to_apply)=%([\w.\-]+)")


def type_bytes(hlo_type: str) -> float:
  """Bytes of an HLO shape, tuples summed (f8 types: 1 byte)."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(hlo_type):
    size = math.prod(int(d.lstrip("<=")) for d in dims.split(",") if d)
    total += size * (1 if dtype.startswith("f8") else _ITEM_BYTES.get(dtype, 0))
  return total


@dataclasses.dataclass(frozen=True)
class Instruction:
  name: str
  type: str
  opcode: str
  args: str  # the text between the opcode's parentheses
  attrs: str  # the text after them
  root: bool


def _closing(text: str, start: int) -> int:
  """Index just past the parenthesis that closes the one at `start`."""
  depth = 0
  for i in range(start, len(text)):
    depth += {"(": 1, ")": -1}.get(text[i], 0)
    if depth == 0:
      return i + 1
  raise ValueError(f"unbalanced HLO line: {text[:200]}")


def parse_instruction(line: str) -> Instruction | None:
  """One line of an HLO computation's body, or None when it is not an instruction."""
  m = _START.match(line)
  if not m:
    return None
  at = m.end()
  end = _closing(line, at) if line[at] == "(" else line.index(" ", at)
  op = re.match(r"\s*([a-z][\w\-]*)\(", line[end:])
  if not op:
    return None
  args_at = end + op.end() - 1
  args_end = _closing(line, args_at)
  return Instruction(m[2], line[at:end], op[1], line[args_at + 1:args_end - 1], line[args_end:],
                     bool(m[1]))


def group_size(attrs: str, devices: int) -> int:
  """Devices per group of a collective's replica_groups (all `devices` when empty)."""
  if m := re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs):
    sizes = {k: int(v) for k, v in re.findall(r"'(\w+)'=(\d+)", m[1])}
    return math.prod(sizes[a] for a in re.findall(r"'(\w+)'", m[2]))
  if m := re.search(r"replica_groups=\[([\d,]+)\]<=", attrs):  # iota: [groups, n]<=[...]
    return int(m[1].split(",")[-1])
  if m := re.search(r"replica_groups=\{\{([\d,]*)\}", attrs):
    return len(m[1].split(","))
  return devices


class Module:
  """An HLO module: its computations ({name: [Instruction]}) and instructions by name."""

  def __init__(self, text: str):
    self.computations, self.instructions, self.entry = {}, {}, None
    m = re.search(r"num_partitions=(\d+)", text)
    self.devices = int(m[1]) if m else 1
    body, pending = None, []
    for line in text.splitlines() + ["}"]:
      if body is not None and (_END.match(line) or _START.match(line)) and pending:
        if ins := parse_instruction(" ".join(pending)):  # a string attribute may hold newlines
          body.append(ins)
          self.instructions[ins.name] = ins
        pending = []
      if body is None:
        if (h := _HEADER.match(line)) and line.rstrip().endswith("{"):
          body = self.computations.setdefault(h[1], [])
          self.entry = h[1] if line.startswith("ENTRY") else self.entry
      elif _END.match(line):
        body = None
      else:
        pending.append(line)
    self._memo = {}

  def _constant(self, name: str) -> int | None:
    """The integer value of `name` if it is a constant (through copies), else None."""
    ins = self.instructions.get(name)
    while ins is not None and ins.opcode in ("copy", "bitcast"):
      ins = self.instructions.get(_NAME.findall(ins.args)[0])
    if ins is not None and ins.opcode == "constant" and re.fullmatch(r"-?\d+", ins.args):
      return int(ins.args)
    return None

  def _tuple_index(self, name: str) -> int | None:
    """k when `name` is get-tuple-element(parameter, index=k), else None."""
    ins = self.instructions[name]
    m = re.search(r"index=(\d+)", ins.attrs)
    return int(m[1]) if ins.opcode == "get-tuple-element" and m else None

  def trip_count(self, loop: Instruction) -> int:
    """Trips of a while loop: its known_trip_count, else from its condition `i < N`, the step
    that its body adds to i (XLA:TPU unrolls some loops by 2) and i's initial value."""
    if m := re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attrs):
      return int(m[1])
    cond = self.computations[re.search(r"condition=%([\w.\-]+)", loop.attrs)[1]]
    root = next(i for i in cond if i.root)
    direction = re.search(r"direction=(\w+)", root.attrs)
    operands = _NAME.findall(root.args)
    if root.opcode == "compare" and direction and direction[1] in ("LT", "GT"):
      i, bound = operands if direction[1] == "LT" else operands[::-1]
      k, n = self._tuple_index(i), self._constant(bound)
      if k is not None and n is not None:
        body = self.computations[re.search(r"body=%([\w.\-]+)", loop.attrs)[1]]
        update = self.instructions[_NAME.findall(next(b for b in body if b.root).args)[k]]
        steps = [self._constant(a) for a in _NAME.findall(update.args)]
        step = next((s for s in steps if s), 1) if update.opcode == "add" else 1
        init = self.instructions[_NAME.findall(loop.args)[0]]
        start = self._constant(_NAME.findall(init.args)[k]) if init.opcode == "tuple" else None
        return max(0, -(-(n - (start or 0)) // step))
    warnings.warn(f"HLO: the trip count of while loop %{loop.name} is unknown; its body is "
                  "counted once")
    return 1

  def operand_types(self, ins: Instruction) -> list[str]:
    """The HLO types of `ins`'s operands, in order."""
    return [self.instructions[name].type for name in _NAME.findall(ins.args)]

  def total(self, computation: str, cost) -> dict[str, float]:
    """Σ cost(instruction) ({key: value}) over one run of `computation`, callees included: a
    while loop's body times its trips, a conditional's costliest branch."""
    memo = self._memo.setdefault(cost, {})
    if computation in memo:
      return memo[computation]
    out = collections.Counter()
    for ins in self.computations[computation]:
      out.update(cost(self, ins))
      if ins.opcode == "while":
        body = self.total(re.search(r"body=%([\w.\-]+)", ins.attrs)[1], cost)
        if any(body.values()):  # a convergence loop (the SVD's) may cost nothing: trips unneeded
          out.update({k: v * self.trip_count(ins) for k, v in body.items()})
      elif ins.opcode == "conditional":
        m = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
        branches = _NAME.findall(m[1]) if m else re.findall(
            r"(?:true|false)_computation=%([\w.\-]+)", ins.attrs)
        out.update(max((self.total(b, cost) for b in branches), key=lambda d: sum(d.values())))
      else:
        for callee in _CALLEES.findall(ins.attrs):
          out.update(self.total(callee, cost))
    memo[computation] = dict(out)
    return memo[computation]


def sent(module: Module, ins: Instruction) -> dict[str, float]:
  """Bytes one device sends in `ins` under the ring algorithms (module docstring)."""
  kind = ins.opcode.removesuffix("-start")
  if kind not in SENT:
    return {}
  operands = module.operand_types(ins)[:1 if kind == "collective-permute" else None]
  b = sum(type_bytes(t) for t in operands)
  return {kind: b * SENT[kind](group_size(ins.attrs, module.devices))}


def per_device(hlo_text: str) -> dict[str, float]:
  """{kind: bytes one device sends per run} of a compiled program (`compiled.as_text()`)."""
  module = Module(hlo_text)
  return dict.fromkeys(KINDS, 0.0) | module.total(module.entry, sent)
