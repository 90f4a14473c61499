"""Per-layer compression plans: ordered rules -> one `LayerPlan` per target module.

A rule is a module glob (or ``re:REGEX``) plus any of the keys in `RULE_KEYS`. Rules apply in
order and each sets only the keys it names, so the last matching rule wins key by key. The CLI
flags form the first rule (``match: "*"``, every key set); ``--plan FILE`` rules refine it:

    rules:
      - {match: "*", method: wanda, scheme: "2:4"}
      - {match: "*mlp*", scheme: unstructured, sparsity: 0.6}
      - {match: "model.layers.0.*", skip: true}

A file is YAML or JSON: a mapping with ``rules`` (a list), a bare list of rules, or an artifact's
manifest (``sparsify.json``, or the artifact directory), whose resolved per-layer plan becomes one
exact rule per module, so a run can be repeated exactly. An allocator (sparsify.allocators) later
overrides ``sparsity`` per layer; the manifest keeps the resolved plan either way.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from sparsify.config import PruneConfig, Scheme, check_sparsity
from sparsify.errors import UserError

RULE_KEYS = ("method", "scheme", "sparsity", "per", "quant", "group_size", "method_args", "skip")


@dataclass(frozen=True)
class LayerPlan:
    """What happens to one target module. ``skip`` leaves it untouched (stored as it was)."""

    module: str
    method: str
    scheme: str
    sparsity: float
    per: str = "row"
    quant: str = "none"
    group_size: int | None = None
    method_args: dict = field(default_factory=dict)
    skip: bool = False

    @property
    def parsed_scheme(self) -> Scheme:
        return Scheme.parse(self.scheme)

    @property
    def quant_spec(self):
        """The `QuantSpec` this layer is rounded to, or None when it is not quantized."""
        from sparsify.quant.spec import QuantSpec  # imports torch: only when asked

        return QuantSpec.parse(self.quant, self.group_size)

    @property
    def effective_sparsity(self) -> float:
        """The fraction this layer loses (N:M fixes it at 1 - N/M; skipped layers lose nothing)."""
        return 0.0 if self.skip else self.parsed_scheme.target_sparsity(self.sparsity)

    def with_sparsity(self, sparsity: float) -> LayerPlan:
        return replace(self, sparsity=check_sparsity(round(float(sparsity), 6)))

    def to_json(self) -> dict:
        return asdict(self)


def base_rule(config: PruneConfig) -> dict:
    """The CLI flags (or library config) as the first rule, every key set."""
    return {"match": "*", "method": config.method, "scheme": str(config.scheme), "sparsity": config.sparsity,
            "per": config.per, "quant": config.quant, "group_size": config.group_size,
            "method_args": dict(config.method_args), "skip": False}


def _check_rule(rule, where: str) -> dict:
    if not isinstance(rule, dict) or not isinstance(rule.get("match"), str):
        raise UserError(f"{where}: each rule needs a 'match' glob, e.g. {{match: '*mlp*', sparsity: 0.6}}")
    unknown = set(rule) - {"match", *RULE_KEYS}
    if unknown:
        raise UserError(f"{where}: unknown key(s) {sorted(unknown)}: a rule may set {', '.join(RULE_KEYS)}")
    if "scheme" in rule:
        rule = {**rule, "scheme": str(Scheme.parse(rule["scheme"]))}
    if "sparsity" in rule:
        check_sparsity(rule["sparsity"])
    if "method_args" in rule and not isinstance(rule["method_args"], dict):
        raise UserError(f"{where}: method_args must be a mapping, e.g. {{damp: 0.01}}")
    return rule


def rules_from_manifest(manifest: dict) -> list[dict]:
    """One exact rule per module of an artifact's resolved plan (skipped modules included)."""
    layers = (manifest.get("plan") or {}).get("layers")
    if not layers:
        raise UserError("this manifest has no resolved plan (written by an older sparsify): pass a rules file")
    return [{"match": name, **{k: v for k, v in layer.items() if k in RULE_KEYS}} for name, layer in layers.items()]


def load_rules(path: str | Path) -> list[dict]:
    """Rules from a YAML / JSON plan file, an artifact manifest or an artifact directory."""
    path = Path(path)
    if path.is_dir():
        path = path / "sparsify.json"
    if not path.is_file():
        raise UserError(f"--plan {path}: no such file: pass a YAML/JSON rules file or an artifact directory")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parser error is the user's file
        raise UserError(f"--plan {path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'} "
                        f"({str(e).splitlines()[0][:100]}): fix the file") from None
    if isinstance(data, dict) and "plan" in data and "tensors" in data:
        return rules_from_manifest(data)
    rules = data.get("rules") if isinstance(data, dict) else data
    if not isinstance(rules, list):
        raise UserError(f"--plan {path}: expected a list under 'rules', e.g. rules: [{{match: '*', scheme: '2:4'}}]")
    return [_check_rule(r, f"--plan {path}, rule {i + 1}") for i, r in enumerate(rules)]


def config_rules(config: PruneConfig) -> tuple[list[dict] | None, str | None]:
    """(rules, where they came from) of ``config.plan``: a path is read, a list is taken inline."""
    if config.plan is None:
        return None, None
    if isinstance(config.plan, list):
        return config.plan, "inline"
    return load_rules(config.plan), str(config.plan)


def resolve(names: list[str], config: PruneConfig, rules: list[dict] | None = None) -> dict[str, LayerPlan]:
    """{module: LayerPlan} for the target ``names``: the config as the first rule, then ``rules`` in order.

    A rule whose pattern matches no target is an error (it is almost always a typo).
    """
    from sparsify.models.layout import matches

    rules = [base_rule(config)] + [_check_rule(r, f"plan rule {i + 1}") for i, r in enumerate(rules or [])]
    for r in rules[1:]:
        if not any(matches(n, r["match"]) for n in names):
            sample = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise UserError(f"plan rule match {r['match']!r} matches no target layer: fix it; names look like: {sample}")
    plans = {}
    for name in names:
        merged: dict = {}
        for r in rules:
            if matches(name, r["match"]):
                merged.update({k: v for k, v in r.items() if k != "match"})
        plans[name] = LayerPlan(module=name, **merged)
    return plans


def to_rules(plans: dict[str, LayerPlan]) -> list[dict]:
    """A resolved plan as exact rules (what ``--save-allocation`` writes and ``--plan`` reads back)."""
    return [{"match": name, **{k: v for k, v in p.to_json().items() if k != "module"}} for name, p in plans.items()]


def save_rules(plans: dict[str, LayerPlan], path: str | Path, note: str = "") -> Path:
    """Write the resolved plan as a rules file (YAML by suffix, else JSON); never over an artifact."""
    path = Path(path)
    if path.name == "sparsify.json":
        raise UserError(f"{path}: refusing to overwrite an artifact manifest: choose another file name")
    data = {"note": note, "rules": to_rules(plans)} if note else {"rules": to_rules(plans)}
    if path.suffix in (".yaml", ".yml"):
        import yaml

        path.write_text(yaml.safe_dump(data, sort_keys=False))
    else:
        path.write_text(json.dumps(data, indent=1))
    return path


def global_sparsity(plans: dict[str, LayerPlan], numel: dict[str, int]) -> float:
    """Parameter-weighted sparsity of the plan over all its modules (skipped ones count as dense)."""
    total = sum(numel[n] for n in plans)
    return sum(p.effective_sparsity * numel[n] for n, p in plans.items()) / max(1, total)
