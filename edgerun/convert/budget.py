"""Size-targeted packs (`edgerun pack --bpw 3.5`, `--size 900MB`): the exact bytes of a recipe, and
the sensitivity-guided choice of one rule per tensor group (embed, attention, ffn, head).

Sizes. Every codec states the bytes of each part it will store for a matrix shape and params
(`Codec.part_nbytes`, before encoding). A recipe's weight bytes are their sum over the model's
tensors (config.tensor_shapes): codes, scales, codebooks, outliers, permutations, norms, embeddings
and head all count. Its file adds what formats/ebin.md adds: the 4096-byte header area, each array
padded to the next 4096 bytes (both exact), and the manifest (bounded from above).

Choice. The options of a group are every registered codec's `Codec.candidates()` that has an exact
size (a new codec plugs in by offering candidates). The loss of a recipe is modelled as additive
over groups, ΔNLL ≈ Σ_g a_g · E_g(rule_g), both factors measured at pack time on the model packed:
- E_g(rule): the relative output error e = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) (H = E[x xᵀ] of the matrix
  input on calibration text, ΔW = W − decode(encode(W))) summed over the group's matrices, from the
  codec's own encoder on a row sample of each matrix in a few evenly spaced layers;
- a_g, the group's sensitivity in nats per unit of E: one forward over calibration windows with
  every matrix of the group perturbed by fixed Gaussian noise of relative mean square NOISE,
  a_g = ΔNLL_g / E_g(noise) with E_g(noise) measured like E_g(rule). (For small errors the loss
  grows linearly with the output's mean square error: the second-order term of a Taylor expansion,
  as in Optimal Brain Surgeon / HAWQ; the layers' inputs are the original model's, as in GPTQ.)
  The embedding counts twice when tied: its input role (looked-up rows, H = I) and its output
  role (the head's logits, H of the final norm's output), each with its own perturbation and a.
The recipe minimising Σ_g a_g · E_g under the byte budget is then found exactly: every combination
of the (at most 4) groups' options, dominated options pruned.
"""
from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from ..codecs import codec_class, codec_names, describe_rule, parse_rule, rotation
from ..codecs.gptq import output_error, shared_factors
from ..config import ModelConfig, tensor_shapes
from ..ebin import ALIGN
from ..errors import EdgerunError
from .pack import GroupTotals

CHOSEN = ("embed", "attention", "ffn", "head")     # groups the chooser sets ("vectors" stay f32)
VECTORS_RULE = {"codec": "dense", "params": {"dtype": "f32"}}
SAMPLE_LAYERS = 2          # layers whose matrices are trial-encoded
SAMPLE_ROWS = 128          # rows of each sampled matrix (blocks of ROW_BLOCK, evenly spaced)
ROW_BLOCK = 32             # whole codebook / statistics groups of the codecs' row layouts
NOISE = 0.02               # relative mean square of the sensitivity perturbation (≈ a 3-bit code)
SENS_WINDOWS = 4           # calibration windows of the sensitivity forward
VOCAB_CHUNK = 8192         # head rows per logits block (and per embedding noise draw)
SEED = 1234


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def tensor_group(name: str, ndim: int) -> str:
    from .pack import tensor_group as group
    return group(name, ndim)


def rule_label(rule: dict) -> str:
    """`cluster:3`, or `spqr:3 outlier_threshold=None` where params differ from the rule's defaults."""
    text = describe_rule(rule)
    default = parse_rule(text)["params"]
    extra = [f"{k}={v}" for k, v in rule["params"].items() if default.get(k, object()) != v]
    return " ".join([text] + extra + (["rotated"] if rule.get("rotate") else []))


def _tensor_cost(name: str, shape: tuple, rule: dict) -> tuple[int, int, int] | None:
    """(weight bytes, bytes padded to ALIGN, manifest bytes bound) of one tensor under `rule`;
    None when its size depends on the values."""
    parts = codec_class(rule["codec"]).part_nbytes(tuple(int(s) for s in shape), rule["params"])
    if parts is None:
        return None
    if rule.get("rotate") and len(shape) == 2 and rotation.block_for(int(shape[1]), rule["rotate"]) > 1:
        parts = {**parts, rotation.SIGNS_PART: int(shape[1])}           # int8 signs
    # a tensor entry + an "arrays" row per part (names, offsets, lengths, crc32, shape, params)
    manifest = 400 + len(name) + sum(2 * len(name) + len(p) + 220 for p in parts)
    return sum(parts.values()), sum(_align(b) for b in parts.values()), manifest


@dataclass
class RecipeSize(GroupTotals):
    """The exact bytes a recipe stores for a model (formats/ebin.md)."""
    group_params: dict = field(default_factory=lambda: defaultdict(int))
    group_bytes: dict = field(default_factory=lambda: defaultdict(int))
    data_bytes: int = ALIGN        # header area + every array padded to ALIGN: the manifest's offset
    manifest_bound: int = 0        # an upper bound of the manifest's length

    @property
    def file_bound(self) -> int:
        return self.data_bytes + self.manifest_bound


def manifest_overhead(meta) -> int:
    """Manifest bytes that do not depend on the recipe, bounded from above (ASCII-escaped JSON)."""
    if meta is None:
        return 0
    static = {"config": meta.config, "tokenizer": [meta.tokenizer_json, meta.chat_template, meta.special_tokens],
              "generation": meta.generation, "source": meta.description}
    return len(json.dumps(static, ensure_ascii=True)) + 16384


def recipe_size(recipe: dict, cfg: ModelConfig, meta=None) -> RecipeSize:
    """Exact weight bytes per group and the manifest offset of the file `pack` writes for `recipe`
    (standard layout); the manifest length bounded from above (`meta`: the source's metadata)."""
    size = RecipeSize(manifest_bound=manifest_overhead(meta))
    for name, shape in tensor_shapes(cfg).items():
        group = tensor_group(name, len(shape))
        cost = _tensor_cost(name, shape, recipe[group])
        if cost is None:
            raise EdgerunError(f"{rule_label(recipe[group])}: its size depends on the weights (e.g. outliers "
                               "above a threshold), so it cannot be sized before packing")
        size.group_params[group] += int(np.prod(shape))
        size.group_bytes[group] += cost[0]
        size.data_bytes += cost[1]
        size.manifest_bound += cost[2]
    return size


# --- the options of each group ------------------------------------------------------------------

@dataclass
class Option:
    rule: dict
    weight_bytes: int
    file_bytes: int                # padded to ALIGN per array, plus its manifest entries' bound
    error: float = 0.0             # E_g: summed relative output error of the sampled matrices
    loss: float = 0.0              # a_g · E_g: predicted ΔNLL (nats per token)

    @property
    def label(self) -> str:
        return rule_label(self.rule)


def group_options(cfg: ModelConfig, rotate: int = 0) -> dict[str, list[Option]]:
    """Every candidate rule of every registered codec, sized exactly, per group the model has;
    `rotate`: compressed rules rotate their inputs (pack.with_rotation)."""
    tensors = defaultdict(list)
    for name, shape in tensor_shapes(cfg).items():
        tensors[tensor_group(name, len(shape))].append((name, shape))
    rules = [{"codec": name, "params": dict(p)} for name in codec_names() for p in codec_class(name).candidates()]
    options = {}
    for group in CHOSEN:
        if not tensors.get(group):
            continue
        opts = []
        for rule in rules:
            codec = codec_class(rule["codec"])
            if rotate and not codec.stacked and codec.name != "dense":       # pack.with_rotation
                rule = {**rule, "rotate": rotate}
            costs = [_tensor_cost(name, shape, rule) for name, shape in tensors[group]]
            if all(c is not None for c in costs):
                opts.append(Option(rule, sum(c[0] for c in costs), sum(c[1] + c[2] for c in costs)))
        options[group] = opts
    return options


# --- measuring: relative output errors and the groups' sensitivities -----------------------------

def _row_sample(d: int, rows: int = SAMPLE_ROWS) -> np.ndarray:
    """Indices of `rows` rows in blocks of ROW_BLOCK spread evenly over d (all when d is small)."""
    if d <= rows:
        return np.arange(d)
    k = rows // ROW_BLOCK
    starts = np.linspace(0, (d - ROW_BLOCK) // ROW_BLOCK, k).round().astype(int) * ROW_BLOCK
    return np.unique(np.concatenate([np.arange(s, min(d, s + ROW_BLOCK)) for s in starts]))


def _rel_error(delta: np.ndarray, w: np.ndarray, H: np.ndarray | None) -> float:
    """tr(Δ H Δᵀ) / tr(W H Wᵀ) (H None: identity)."""
    return output_error(delta, H) / max(output_error(w, H), 1e-30)


def trial_errors(w: np.ndarray, H, options: list[Option], metrics) -> tuple[np.ndarray, np.ndarray]:
    """Each option's codec encodes a row sample of w with the input statistics H (as pack does);
    for every metric (H_m, noise) of `metrics`, the relative output error tr(Δ H_m Δᵀ)/tr(W H_m Wᵀ)
    of the perturbation (`noise(rows)` its rows) and of each option: (metrics,), (options, metrics).
    The options' GPTQ factorizations of the same H are computed once (gptq.shared_factors)."""
    rows = _row_sample(w.shape[0])
    return sampled_trial_errors(np.ascontiguousarray(w[rows]), rows, H, options, metrics)


def sampled_trial_errors(ws: np.ndarray, rows: np.ndarray, H, options: list[Option], metrics):
    """`trial_errors` of a matrix's row sample `ws` (its rows `rows`, `_row_sample`)."""
    errs = np.zeros((len(options), len(metrics)))
    rotated = {}
    n = ws.shape[1]
    with shared_factors():
        for i, opt in enumerate(options):
            codec = codec_class(opt.rule["codec"])
            block = rotation.block_for(n, opt.rule["rotate"]) if opt.rule.get("rotate") else 1
            if block > 1:             # as pack encodes it: W·Tᵀ with T H Tᵀ, decoded and rotated back
                if block not in rotated:
                    signs = rotation.make_signs(n, "trial")
                    Hr = None if H is None else H.copy()
                    if Hr is not None:
                        rotation.rotate_hessian(Hr, signs, block)
                    rotated[block] = (signs, rotation.rotate(ws, signs, block), Hr)
                signs, wr, Hr = rotated[block]
                q = rotation.unrotate(codec.decode(codec.encode(wr, opt.rule["params"], hessian=Hr),
                                                   opt.rule["params"]), signs, block)
            else:
                q = codec.decode(codec.encode(ws, opt.rule["params"], hessian=H), opt.rule["params"])
            errs[i] = [_rel_error(ws - q, ws, Hm) for Hm, _ in metrics]
    return np.array([_rel_error(noise(rows), ws, Hm) for Hm, noise in metrics]), errs


def _mean_square(w: np.ndarray) -> float:
    """mean(w²), summed in float64 a block of VOCAB_CHUNK rows at a time: np.mean(w.astype(float64)
    ** 2) held two float64 copies of w, 3.7 GB for the 1.5B's embedding (the --bpw pack's peak)."""
    total = 0.0
    for r0 in range(0, len(w), VOCAB_CHUNK):
        block = w[r0:r0 + VOCAB_CHUNK].astype(np.float64).ravel()
        total += float(block @ block)
    return total / max(w.size, 1)


def _perturbation(w: np.ndarray, key) -> np.ndarray:
    """Fixed Gaussian noise of mean square NOISE · mean(w²) (seeded by `key`)."""
    rng = np.random.default_rng([SEED, *key])
    scale = math.sqrt(NOISE * _mean_square(w))
    return (rng.standard_normal(w.shape, dtype=np.float32) * np.float32(scale))


def _embed_noise(V: int, d: int, scale: float, r0: int, r1: int) -> np.ndarray:
    """Rows r0..r1 (inside one VOCAB_CHUNK) of the embedding's fixed perturbation."""
    c = r0 // VOCAB_CHUNK
    rng = np.random.default_rng([SEED, 1 << 20, c])
    block = rng.standard_normal((min(V, (c + 1) * VOCAB_CHUNK) - c * VOCAB_CHUNK, d), dtype=np.float32)
    return block[r0 - c * VOCAB_CHUNK:r1 - c * VOCAB_CHUNK] * np.float32(scale)


def _nll(normed: np.ndarray, targets: np.ndarray, head: np.ndarray, noise_scale: float | None) -> float:
    """Mean -log p(target) of logits normed (N, d) @ (head + noise)ᵀ, in vocabulary blocks."""
    V, N = head.shape[0], normed.shape[0]
    m = np.full(N, -np.inf)
    s = np.zeros(N)
    t = np.zeros(N)
    for r0 in range(0, V, VOCAB_CHUNK):
        r1 = min(V, r0 + VOCAB_CHUNK)
        w = head[r0:r1]
        if noise_scale is not None:
            w = w + _embed_noise(V, head.shape[1], noise_scale, r0, r1)
        z = (normed @ w.T).astype(np.float64)
        mz = np.maximum(m, z.max(1))
        s = s * np.exp(m - mz) + np.exp(z - mz[:, None]).sum(1)
        m = mz
        inside = (targets >= r0) & (targets < r1)
        t[inside] = z[inside, targets[inside] - r0]
    return float(np.mean(m + np.log(s) - t))


def measure(source, cfg: ModelConfig, sequences: np.ndarray, options: dict[str, list[Option]],
            progress=None) -> dict[str, float]:
    """Fill each option's `error` and `loss` (module docstring); returns the sensitivity a of each role
    measured ("attention", "ffn", "embed.input", "embed.output" or "head") and "base_nll".
    `sequences` (n, T) calibration windows; `progress(done, total)` per layer."""
    from ..calibrate import SHARED_INPUT, HessianAccumulator, RecordingLinear, f32_linear
    from ..kernels import rmsnorm_rows
    from ..model import LAYER_TENSORS, Layer, Transformer, Weights

    fields = {"attention": ("q", "k", "v", "o"), "ffn": ("gate", "up", "down")}
    n_seq, T = sequences.shape
    L = cfg.num_layers
    sampled = set(np.linspace(0, L - 1, min(SAMPLE_LAYERS, L) + 2).round().astype(int)[1:-1]) if L > 2 \
        else set(range(L))
    tied = cfg.tie_word_embeddings
    noisy = [g for g in CHOSEN if len(options.get(g, ())) > 1]
    embed = source.read("model.embed_tokens.weight")
    V, d = embed.shape
    embed_scale = math.sqrt(NOISE * _mean_square(embed))
    embed_rows = _row_sample(V)
    embed_sample = np.ascontiguousarray(embed[embed_rows])      # what its trial encodes read
    states = {"base": embed[sequences]}
    if "embed" in noisy:
        x = states["base"].copy()
        for r0 in range(0, V, VOCAB_CHUNK):
            r1 = min(V, r0 + VOCAB_CHUNK)
            at = (sequences >= r0) & (sequences < r1)
            if at.any():
                x[at] += _embed_noise(V, d, embed_scale, r0, r1)[sequences[at] - r0]
        states["embed"] = x
    for g in ("attention", "ffn"):
        if g in noisy:
            states[g] = states["base"].copy()
    if not tied:
        del embed           # 0.9 GB of float32 for the 1.5B: not held beside its output head
    # whole windows per forward step: one BLAS matmul per window and linear, as calibrate.py runs
    tf = Transformer(cfg, Weights({"model.embed_tokens.weight": None}, cfg), context=T, chunk=T,
                     layers=[None] * L)
    noise_err, trial_err = defaultdict(float), defaultdict(lambda: np.zeros(0))
    available = set(source.tensor_names())
    if progress:
        progress(0, L)
    for i in range(L):
        names = {f: f"model.layers.{i}.{n}" for f, n in LAYER_TENSORS.items()}
        w = {f: source.read(n) for f, n in names.items() if n in available}
        lin = {f: f32_linear(a) if f in SHARED_INPUT else a for f, a in w.items()}
        accs = {}
        base = dict(lin)
        if i in sampled:
            for f in SHARED_INPUT:
                if f in w:
                    acc = accs.setdefault(SHARED_INPUT[f], HessianAccumulator(w[f].shape[1]))
                    base[f] = RecordingLinear(lin[f], acc)
        perturb = {}
        for stream, x in states.items():
            layer = base if stream == "base" else dict(lin)
            if stream in fields:
                for j, f in enumerate(fields[stream]):
                    perturb[f] = _perturbation(w[f], (i, j))
                    layer[f] = f32_linear(w[f] + perturb[f])
            tf.layers[i] = Layer(**{f: layer.get(f) for f in LAYER_TENSORS})
            for s in range(n_seq):
                tf.block(i, x[s], 0)
        if i in sampled:
            for g in ("attention", "ffn"):
                if g not in noisy:
                    continue
                for j, f in enumerate(fields[g]):
                    H = accs[SHARED_INPUT[f]].hessian()
                    e_noise, errs = trial_errors(w[f], H, options[g], [(H, perturb[f].__getitem__)])
                    noise_err[g] += e_noise[0]
                    trial_err[g] = trial_err[g] + errs[:, 0] if trial_err[g].size else errs[:, 0]
        tf.layers[i] = None
        del w, lin, base, accs, perturb
        if progress:
            progress(i + 1, L)

    # the head: final norm, logits and NLL of the next token in every window
    final = source.read("model.norm.weight")
    targets = sequences[:, 1:].reshape(-1)
    head_acc = HessianAccumulator(d)
    normed = {}
    for stream, x in states.items():
        out = np.empty((n_seq, T, d), np.float32)
        for s in range(n_seq):
            rmsnorm_rows(x[s], final, cfg.rms_norm_eps, out[s])
            if stream == "base":
                head_acc.add(out[s])
        normed[stream] = out[:, :-1].reshape(-1, d)
    H_head = head_acc.hessian()
    head = embed if tied else source.read("lm_head.weight")
    nll = {"base": _nll(normed["base"], targets, head, None)}
    # role -> (group, ΔNLL of its perturbation, its relative output error, each option's)
    roles = {g: (g, _nll(normed[g], targets, head, None) - nll["base"], noise_err[g], trial_err[g])
             for g in ("attention", "ffn") if g in states}
    # The embedding has an input role (rows looked up: error measured without H) and, tied, the
    # output role of the head (logits: error under the head's input statistics H_head); a tied
    # embedding is encoded with H_head as pack does (calibrate.py), which can cost the input role.
    if "embed" in states:
        noise_in = _noise_rows(V, d, embed_scale)
        metrics = [(None, noise_in)] + ([(H_head, noise_in)] if tied else [])
        e_noise, errs = sampled_trial_errors(embed_sample, embed_rows, H_head if tied else None, options["embed"],
                                             metrics)
        roles["embed.input"] = ("embed", _nll(normed["embed"], targets, head, None) - nll["base"],
                                e_noise[0], errs[:, 0])
        if tied:
            roles["embed.output"] = ("embed", _nll(normed["base"], targets, head, embed_scale) - nll["base"],
                                     e_noise[1], errs[:, 1])
    if "head" in noisy:
        scale = math.sqrt(NOISE * _mean_square(head))
        noise_out = _noise_rows(V, d, scale)
        e_noise, errs = trial_errors(head, H_head, options["head"], [(H_head, noise_out)])
        roles["head"] = ("head", _nll(normed["base"], targets, head, scale) - nll["base"], e_noise[0], errs[:, 0])

    sensitivity = {}
    for g in noisy:
        for opt in options[g]:
            opt.error = opt.loss = 0.0
    for role, (g, dnll, e_noise, errs) in roles.items():
        # a perturbation that did not raise the loss measurably still bounds it: floor at 1e-4 nats
        a = max(dnll, 1e-4) / max(e_noise, 1e-30)
        sensitivity[role] = a
        for opt, e in zip(options[g], errs):
            opt.error += float(e)
            opt.loss += float(a * e)
    sensitivity["base_nll"] = nll["base"]
    return sensitivity


def _noise_rows(V: int, d: int, scale: float):
    """rows -> those rows of the embedding/head perturbation (_embed_noise)."""
    def rows_of(rows):
        out = np.empty((len(rows), d), np.float32)
        for c in np.unique(rows // VOCAB_CHUNK):              # one draw per vocabulary chunk
            at = rows // VOCAB_CHUNK == c
            block = _embed_noise(V, d, scale, c * VOCAB_CHUNK, min(V, (c + 1) * VOCAB_CHUNK))
            out[at] = block[rows[at] - c * VOCAB_CHUNK]
        return out
    return rows_of


# --- choosing -----------------------------------------------------------------------------------

class TargetTooSmall(EdgerunError):
    pass


@dataclass
class Choice:
    recipe: dict
    size: RecipeSize
    options: dict                  # group -> the chosen Option
    loss: float                    # predicted ΔNLL (nats per token)


def budget_bytes(cfg: ModelConfig, bpw: float | None = None, size: int | None = None) -> tuple[int, str]:
    """(bytes, "weights" | "file") of a --bpw or --size target."""
    if (bpw is None) == (size is None):
        raise EdgerunError("give one of --bpw or --size")
    if bpw is not None:
        if not bpw > 0:
            raise EdgerunError(f"--bpw must be positive, got {bpw}")
        return int(bpw * cfg.parameter_count / 8), "weights"
    return int(size), "file"


def _recipe(combo: dict) -> dict:
    """Group -> rule for every group pack knows (a tied model has no head tensor: any rule)."""
    rules = {g: o.rule for g, o in combo.items()}
    return {**{g: rules.get(g, rules.get("embed", VECTORS_RULE)) for g in CHOSEN}, "vectors": VECTORS_RULE}


def _fixed_bytes(cfg: ModelConfig, meta, by: str) -> int:
    """Bytes outside the chosen groups: the f32 vectors (norms, biases); for a file also the header
    area and the recipe-independent manifest."""
    fixed = 0 if by == "weights" else ALIGN + manifest_overhead(meta)
    for name, shape in tensor_shapes(cfg).items():
        if tensor_group(name, len(shape)) not in CHOSEN:
            cost = _tensor_cost(name, shape, VECTORS_RULE)
            fixed += cost[0] if by == "weights" else cost[1] + cost[2]
    return fixed


def _pareto(opts: list[Option], key) -> list[Option]:
    """Options not dominated (another no larger with a loss no higher)."""
    out = []
    for o in sorted(opts, key=lambda o: (key(o), o.loss)):
        if not out or o.loss < out[-1].loss:
            out.append(o)
    return out


def _size_key(by: str):
    """Option -> the bytes a target of kind `by` ("weights" or "file") counts."""
    return (lambda o: o.weight_bytes) if by == "weights" else (lambda o: o.file_bytes)


def feasible(options: dict[str, list[Option]], cfg: ModelConfig, budget: int, by: str = "weights",
             meta=None) -> dict[str, list[Option]]:
    """Each group's options that fit `budget` with the smallest option of every other group: no
    other can be chosen, so measuring them (trial encodes, the most expensive part) is skipped."""
    key = _size_key(by)
    smallest = {g: min(key(o) for o in opts) for g, opts in options.items()}
    room = budget - _fixed_bytes(cfg, meta, by) - sum(smallest.values())
    return {g: [o for o in opts if key(o) - smallest[g] <= room] for g, opts in options.items()}


def choose(options: dict[str, list[Option]], cfg: ModelConfig, budget: int, by: str = "weights",
           meta=None) -> Choice:
    """One option per group with the least summed loss whose bytes fit `budget`: the weight bytes
    (`by="weights"`) or the file's bound (`by="file"`). TargetTooSmall naming the smallest pack
    when nothing fits."""
    key = _size_key(by)
    groups = list(options)
    smallest = {g: min(options[g], key=key) for g in groups}
    fixed = _fixed_bytes(cfg, meta, by)
    best = None
    for combo in itertools.product(*(_pareto(options[g], key) for g in groups)):
        total = fixed + sum(key(o) for o in combo)
        loss = sum(o.loss for o in combo)
        if total <= budget and (best is None or (loss, total) < best[0]):
            best = ((loss, total), dict(zip(groups, combo)))
    if best is None:
        rules = ", ".join(f"{g}={o.label}" for g, o in smallest.items())
        least = fixed + sum(key(o) for o in smallest.values())
        if by == "weights":
            params = cfg.parameter_count
            raise TargetTooSmall(f"--bpw {8 * budget / params:.3f} is below the smallest pack of this model: "
                                 f"{8 * least / params:.3f} bits/weight ({rules}; norms f32)")
        raise TargetTooSmall(f"--size {budget / 1e6:.1f} MB is below the smallest pack of this model: "
                             f"{least / 1e6:.1f} MB ({rules}; norms f32)")
    recipe = _recipe(best[1])
    return Choice(recipe, recipe_size(recipe, cfg, meta), best[1], best[0][0])


def auto_recipe(src, bpw: float | None = None, size: int | None = None, calib_text: str | None = None,
                threads: int | None = None, log=print, progress=None, rotate: int = 0) -> Choice:
    """The recipe `pack --bpw/--size` packs `src` with: sized exactly, chosen by the loss measured on
    calibration text (module docstring); logs every group's options and the choice. `rotate`:
    the compressed candidates rotate their inputs (sized and measured so)."""
    from .. import kernels
    from ..calibrate import source_calibration_sequences
    from ..config import ConfigError
    from .pack import CALIB_SEQ_LEN, open_source
    with open_source(src) as source:
        meta = source.meta
        try:
            cfg = ModelConfig.from_dict(meta.config)
        except ConfigError as e:
            raise ConfigError(f"{src}: {e}") from None
        budget, by = budget_bytes(cfg, bpw, size)
        options = group_options(cfg, rotate)
        choose(options, cfg, budget, by, meta)            # an impossible target fails before measuring
        options = feasible(options, cfg, budget, by, meta)
        sequences = source_calibration_sequences(meta, calib_text, SENS_WINDOWS * CALIB_SEQ_LEN, CALIB_SEQ_LEN)
        before = kernels.get_threads()
        kernels.set_threads(threads or kernels.default_threads())
        try:
            sens = measure(source, cfg, sequences, options, progress)
        finally:
            kernels.set_threads(before)
    choice = choose(options, cfg, budget, by, meta)
    sizes = recipe_size(choice.recipe, cfg)
    log(f"sensitivity on {sequences.size} calibration tokens (NLL {sens['base_nll']:.3f}; noise of relative "
        f"mean square {NOISE} per group):")
    for g, opts in options.items():
        params = sizes.group_params[g]
        listed = ", ".join(f"{o.label} {8 * o.weight_bytes / params:.2f}b {o.loss:+.4f}" for o in
                           sorted(opts, key=lambda o: o.weight_bytes))
        a = ", ".join(f"{r} {v:.3g}" for r, v in sens.items() if r.split(".")[0] == g)
        log(f"  {g} (nats per unit of relative output error: {a}); options (bits/weight, predicted ΔNLL): {listed}")
    s = choice.size
    chosen = ", ".join(f"{g}={o.label} ({s.bits([g]):.2f} bits/weight)" for g, o in choice.options.items())
    target = f"--bpw {bpw}" if bpw is not None else f"--size {size / 1e6:.1f} MB (file)"
    log(f"chose {chosen}; norms f32")
    log(f"for {target}: weights {s.weight_bytes:,} bytes = {s.bits():.3f} bits/weight over all {s.parameters:,} "
        f"weights, {s.bits(['embed', 'attention', 'ffn', 'head']):.3f} over the matrices, "
        f"{s.bits(['attention', 'ffn']):.3f} over attention+ffn; file ≤ {s.file_bound / 1e6:.1f} MB; "
        f"predicted ΔNLL {choice.loss:+.4f} nats/token")
    return choice
