"""A synthetic zoo for scale: N PEFT LoRA adapters of a base model's shapes, each with its own
topic, so that routing over thousands of them means something.

- Shapes come from the base's config (a model built on the meta device: no weights needed for
  them), for any architecture whose projections are named like Llama's.
- Ranks are mixed (4, 8, 16) and so are target modules (q and v always, each other projection
  with probability one half), as in a real zoo collected from many trainers.
- Factors are random, scaled so that each module's task vector has the norm real adapters
  have relative to their base weight: `||s B A||_F = rho * ||W||_F`, with `rho` measured on the
  six trained demo adapters (0.016-0.020 on average per projection type, 0.004-0.10 overall:
  `RELATIVE_NORM`, drawn log-normally around it).
- Exemplars: every adapter gets one topic, a (domain, facet) pair such as ("beekeeping",
  "beginner mistakes"), phrased in several ways with the domain's own keywords; `eval.jsonl`
  holds other phrasings of the same topic (answers empty: there is nothing to score, only a
  route to check).

Written in bfloat16, about 1-5 MB per adapter on the demo base. Not committed: `dynamerge zoo
synth --adapters N --out DIR` makes it in seconds to minutes.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# ||delta||_F / ||W||_F of the trained demo adapters, mean over their modules (gate_proj is
# untrained in the demo; it takes up_proj's value).
RELATIVE_NORM = {"q_proj": 0.0195, "k_proj": 0.0180, "v_proj": 0.0192, "o_proj": 0.0190,
                 "gate_proj": 0.0187, "up_proj": 0.0187, "down_proj": 0.0160}
_NORM_SPREAD = 0.6  # sigma of the log-normal jitter around RELATIVE_NORM (demo: x0.25-x5)
RANKS = (4, 8, 16)
_RANK_WEIGHTS = (0.3, 0.5, 0.2)

DOMAINS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("beekeeping", ("hives", "honey", "queen bees", "swarms")),
    ("sourdough baking", ("starters", "loaves", "proofing", "crusts")),
    ("bicycle repair", ("brakes", "derailleurs", "inner tubes", "chains")),
    ("amateur astronomy", ("telescopes", "nebulae", "star charts", "eyepieces")),
    ("knitting", ("yarn", "needles", "cable stitches", "sweaters")),
    ("competitive chess", ("openings", "endgames", "tournaments", "ratings")),
    ("home aquariums", ("filters", "tropical fish", "water chemistry", "aquatic plants")),
    ("rock climbing", ("harnesses", "belaying", "bouldering", "crags")),
    ("vegetable gardening", ("tomatoes", "raised beds", "compost", "seedlings")),
    ("woodworking", ("chisels", "dovetail joints", "hardwood", "wood glue")),
    ("birdwatching", ("binoculars", "warblers", "field guides", "migration")),
    ("wine making", ("grapes", "fermentation", "oak barrels", "yeast")),
    ("jazz piano", ("chord voicings", "improvisation", "swing rhythm", "standards")),
    ("marathon running", ("training plans", "running shoes", "pacing", "long runs")),
    ("oil painting", ("canvases", "brushes", "pigments", "glazing")),
    ("urban cycling commutes", ("bike lanes", "panniers", "traffic", "locks")),
    ("coffee roasting", ("green beans", "roast profiles", "espresso", "grinders")),
    ("mushroom foraging", ("chanterelles", "spore prints", "toxic look-alikes", "forests")),
    ("model railways", ("locomotives", "track layouts", "scale models", "scenery")),
    ("scuba diving", ("regulators", "coral reefs", "dive computers", "buoyancy")),
    ("pottery", ("clay", "kilns", "glazes", "the wheel")),
    ("cheese making", ("rennet", "curds", "aging caves", "brine")),
    ("drone photography", ("gimbals", "flight permits", "aerial shots", "batteries")),
    ("calligraphy", ("nibs", "ink", "brush lettering", "scripts")),
    ("beer brewing", ("hops", "malt", "wort", "kegs")),
    ("tarot history", ("decks", "major arcana", "card games", "symbolism")),
    ("sailing", ("knots", "rigging", "tacking", "dinghies")),
    ("origami", ("paper cranes", "folds", "crease patterns", "modular designs")),
    ("vintage car restoration", ("carburetors", "rust", "chrome trim", "engines")),
    ("podcast production", ("microphones", "editing", "episode planning", "audio levels")),
    ("houseplant care", ("succulents", "repotting", "watering", "light levels")),
    ("fly fishing", ("fly rods", "trout", "casting", "tied flies")),
    ("stamp collecting", ("rare stamps", "albums", "postmarks", "perforations")),
    ("ballroom dancing", ("waltz", "tango", "footwork", "posture")),
    ("solar panel installation", ("inverters", "roof mounts", "batteries", "wiring")),
    ("retro video games", ("cartridges", "consoles", "emulators", "speedruns")),
    ("candle making", ("soy wax", "wicks", "fragrance oils", "molds")),
    ("horse riding", ("saddles", "trotting", "stables", "hooves")),
    ("genealogy research", ("family trees", "census records", "ancestors", "archives")),
    ("mechanical keyboards", ("switches", "keycaps", "soldering", "layouts")),
    ("sushi making", ("rice vinegar", "nori", "raw fish", "knives")),
    ("archery", ("bows", "arrows", "targets", "draw weight")),
    ("tea ceremonies", ("matcha", "whisks", "tea houses", "etiquette")),
    ("bonsai", ("pruning", "junipers", "wiring branches", "shallow pots")),
    ("motorcycle touring", ("panniers", "road trips", "helmets", "tires")),
    ("soap making", ("lye", "oils", "curing", "moulds")),
    ("kite surfing", ("kites", "boards", "wind", "harness lines")),
    ("magic tricks", ("card tricks", "sleight of hand", "illusions", "props")),
    ("leather crafting", ("hides", "stitching", "tooling", "wallets")),
    ("glass blowing", ("furnaces", "molten glass", "pipes", "annealing")),
)
FACETS: tuple[tuple[str, ...], ...] = (
    ("What are common beginner mistakes in {d}?", "I'm new to {d}; which errors with {k} "
     "should I avoid?", "Which mistakes do first-timers make with {k} in {d}?"),
    ("How did {d} begin historically?", "Tell me the history of {k} in {d}.",
     "Who were the pioneers of {d}?"),
    ("Which tools do I need to start {d}?", "What equipment for {k} is essential in {d}?",
     "Recommend starter gear for {d}."),
    ("How much does getting into {d} cost?", "Is {d} an expensive hobby, {k} included?",
     "Give me a budget for {k} in {d}."),
    ("How do I stay safe while doing {d}?", "What are the safety risks of {k} in {d}?",
     "Which precautions matter most around {k} in {d}?"),
    ("Are there competitions for {d}?", "How are {k} judged at {d} contests?",
     "Where can I compete in {d}?"),
    ("Can {d} be a career?", "How do professionals earn money from {k} in {d}?",
     "What jobs exist in {d}?"),
    ("How do I clean and maintain {k} for {d}?", "What maintenance do {k} need in {d}?",
     "How often should I service my {k} for {d}?"),
    ("What books teach {d}?", "Recommend a good guide about {k} in {d}.",
     "Which resources explain {d} for self-learners?"),
    ("How do I practise {d} at home?", "Give me a weekly practice plan for {k} in {d}.",
     "What daily drills improve my {d}?"),
    ("What is the science behind {k} in {d}?", "Explain the physics or chemistry of {d}.",
     "Why do {k} behave the way they do in {d}?"),
    ("How do I teach {d} to children?", "Is {d} suitable for kids, with {k}?",
     "Make {d} fun for a ten-year-old."),
    ("What are the environmental impacts of {d}?", "Is {d} sustainable, given the {k}?",
     "How can {d} be greener?"),
    ("Where can I find a club for {d}?", "How do I meet other people into {k} and {d}?",
     "Are there online communities for {d}?"),
    ("What advanced techniques exist in {d}?", "How do experts master {k} in {d}?",
     "Teach me an expert-level trick for {d}."),
    ("How do I photograph my {d} projects?", "Tips for taking pictures of {k} from {d}?",
     "How should I document my progress in {d}?"),
    ("What vocabulary should I know in {d}?", "Define the key terms around {k} in {d}.",
     "Give me a glossary of {d} jargon."),
    ("How has technology changed {d}?", "Which modern inventions improved {k} in {d}?",
     "Is there software that helps with {d}?"),
    ("What seasonal advice applies to {d}?", "How does winter affect {k} in {d}?",
     "When is the best time of year for {d}?"),
    ("How do I store {k} for {d}?", "Where should I keep my {d} supplies?",
     "How long do {k} last when stored for {d}?"),
    ("What are famous events in {d}?", "Tell me about a record-breaking moment with {k} in "
     "{d}.", "Which festivals celebrate {d}?"),
    ("How do I fix a problem with {k} in {d}?", "Troubleshoot my {d}: the {k} misbehave.",
     "Something went wrong with my {k} during {d}; what now?"),
    ("Which regions of the world are known for {d}?", "Where do the best {k} for {d} come "
     "from?", "Which countries love {d} most?"),
    ("What health benefits does {d} bring?", "Does working with {k} in {d} relieve stress?",
     "Is {d} good exercise for the mind or body?"),
    ("How do I choose quality {k} for {d}?", "What separates cheap from good {k} in {d}?",
     "Help me compare brands of {k} for {d}."),
)
_EXEMPLAR_SUFFIXES = ("", " Please keep it short.", " I would love a detailed answer.",
                      " Thanks in advance!")
_EVAL_SUFFIXES = (" Explain like I'm a beginner.", " What do you think?")


def topics(n: int) -> list[tuple[int, int]]:
    """(domain, facet) of each of `n` adapters: every pair once, shuffled, then cycling."""
    pairs = [(d, f) for d in range(len(DOMAINS)) for f in range(len(FACETS))]
    random.Random(0).shuffle(pairs)
    return [pairs[i % len(pairs)] for i in range(n)]


def topic_prompts(domain: int, facet: int, suffixes: tuple[str, ...]) -> list[str]:
    """Every phrasing of one topic, with each keyword of its domain and each suffix."""
    name, keywords = DOMAINS[domain]
    out = []
    for template in FACETS[facet]:
        for keyword in keywords if "{k}" in template else keywords[:1]:
            for suffix in suffixes:
                out.append(template.format(d=name, k=keyword) + suffix)
    return list(dict.fromkeys(out))


def base_projections(base_dir: Path) -> dict[str, tuple[int, int]]:
    """`{module name: (out, in)}` of the base's projection layers, from its config alone."""
    config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {
        name: (module.out_features, module.in_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS
    }


def base_weight_norms(base_dir: Path, modules: list[str]) -> dict[str, float]:
    """Frobenius norm of each module's pre-trained weight, read tensor by tensor."""
    norms = {}
    for path in sorted(Path(base_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                module = key.removesuffix(".weight")
                if module in modules:
                    norms[module] = float(f.get_tensor(key).float().norm())
    missing = sorted(set(modules) - set(norms))
    if missing:
        raise ValueError(f"the base checkpoint lacks weights for {missing[:3]}...")
    return norms


def synth_zoo(
    base_dir: Path,
    out: Path,
    n: int,
    seed: int = 0,
    base_model_name: str = "synthetic-base",
    show_progress: bool = True,
) -> list[str]:
    """Write `n` adapters (`synth-0000`, ...) into `out`. Returns their ids.

    Args:
        base_dir: the base checkpoint (its config gives the shapes, its weights the norms).
        out: the store directory to fill.
        n: number of adapters.
        seed: makes everything reproducible.
        base_model_name: written as `base_model_name_or_path` in each config.
        show_progress: a progress bar.
    """
    threads = torch.get_num_threads()
    # The matrices are tiny: a second thread only fights for a core (on 2 busy cores one
    # thread wrote 20 demo-shaped adapters in 2.4 s, two threads in 16.5 s).
    torch.set_num_threads(1)
    try:
        return _write_zoo(base_dir, Path(out), n, seed, base_model_name, show_progress)
    finally:
        torch.set_num_threads(threads)


def _write_zoo(base_dir: Path, out: Path, n: int, seed: int, base_model_name: str,
               show_progress: bool) -> list[str]:
    shapes = base_projections(base_dir)
    norms = base_weight_norms(base_dir, list(shapes))
    out.mkdir(parents=True, exist_ok=True)
    ids = []
    for i, (domain, facet) in enumerate(tqdm(topics(n), desc="Writing adapters",
                                             unit="adapter", disable=not show_progress)):
        adapter_id = f"synth-{i:04d}"
        rng = random.Random(f"{seed}:{i}")
        generator = torch.Generator().manual_seed(rng.randrange(2**31))
        rank = rng.choices(RANKS, _RANK_WEIGHTS)[0]
        targets = [p for p in PROJECTIONS
                   if p in ("q_proj", "v_proj") or rng.random() < 0.5]
        alpha = 2 * rank
        tensors = {}
        for module, (rows, cols) in shapes.items():
            if module.rsplit(".", 1)[-1] not in targets:
                continue
            a = torch.randn(rank, cols, generator=generator) / math.sqrt(cols)
            b = torch.randn(rows, rank, generator=generator)
            wanted = RELATIVE_NORM[module.rsplit(".", 1)[-1]] * norms[module] * math.exp(
                rng.gauss(0.0, _NORM_SPREAD))
            # ||B A||_F^2 = trace((B^T B)(A A^T)): r x r products, never the [out, in] one.
            current = (alpha / rank) * float(torch.trace((b.T @ b) @ (a @ a.T))) ** 0.5
            b *= wanted / current
            prefix = f"base_model.model.{module}"
            tensors[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16).contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16).contiguous()
        folder = out / adapter_id
        folder.mkdir(exist_ok=True)
        save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        (folder / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
            "target_modules": targets, "lora_dropout": 0.0, "bias": "none",
            "base_model_name_or_path": base_model_name, "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "modules_to_save": None,
            "inference_mode": True,
        }, indent=1))
        _write_jsonl(folder / "exemplars.jsonl",
                     [{"text": t} for t in topic_prompts(domain, facet, _EXEMPLAR_SUFFIXES)])
        _write_jsonl(folder / "eval.jsonl", [{"prompt": t, "answer": ""}
                                             for t in topic_prompts(domain, facet,
                                                                    _EVAL_SUFFIXES)])
        ids.append(adapter_id)
    return ids


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
