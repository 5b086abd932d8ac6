"""A micro zoo for tests and smoke runs, built in seconds, in exactly the demo zoo's formats.

A randomly initialised 2-layer Llama (same family as the demo base) with a byte-level BPE
tokenizer trained on the spot and a ChatML template, plus LoRA adapters made by PEFT itself
with random factors. The adapters differ on purpose in rank, target modules and scaling rule
(one uses rsLoRA), so that padding and scaling are exercised.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Three topics the real sentence embedder separates well; each gets its own adapter.
_TOPICS: dict[str, tuple[list[str], list[str]]] = {
    "math": (
        ["What is {a} plus {b}?", "Compute {a} times {b}.", "Subtract {b} from {a}.",
         "How much is {a} divided by {b}?", "Add {a} and {b} together."],
        [str(n) for n in range(2, 40)],
    ),
    "cooking": (
        ["How long should I bake {a} at {b} degrees?", "Give me a recipe with {a}.",
         "What spices go well with {a}?", "How do I chop {a} finely?",
         "Can I roast {a} in the oven?"],
        ["potatoes", "garlic", "salmon", "carrots", "bread", "chicken", "onions", "rice",
         "tomatoes", "mushrooms", "lentils", "pasta", "eggplant", "tofu", "apples"],
    ),
    "travel": (
        ["Which sights should I visit in {a}?", "How do I get from the airport to {a}?",
         "What is the best season to travel to {a}?", "Find me a cheap hotel in {a}.",
         "Is it safe to hike near {a}?"],
        ["Lisbon", "Kyoto", "Lima", "Oslo", "Nairobi", "Quebec", "Hanoi", "Porto",
         "Cusco", "Seville", "Tbilisi", "Reykjavik", "Marrakesh", "Krakow", "Tallinn"],
    ),
}
# (rank, lora_alpha, target modules, rsLoRA) per adapter, in topic order.
_ADAPTER_SHAPES = [
    (4, 8, ["q_proj", "v_proj"], False),
    (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj"], False),
    (2, 4, ["gate_proj", "up_proj", "down_proj", "q_proj"], True),
]


@dataclass(frozen=True)
class MicroZoo:
    base_dir: Path  # Hugging Face checkpoint directory (config, safetensors, tokenizer)
    store_dir: Path  # adapter store, one directory per adapter
    adapter_ids: tuple[str, ...]

    def exemplars(self, adapter_id: str) -> list[str]:
        lines = (self.store_dir / adapter_id / "exemplars.jsonl").read_text().splitlines()
        return [json.loads(line)["text"] for line in lines]


def topic_prompts(topic: str, count: int, offset: int = 0) -> list[str]:
    """Deterministic prompts for a micro-zoo topic; `offset` gives a disjoint set."""
    templates, fillers = _TOPICS[topic]
    prompts = []
    for i in range(offset, offset + count):
        template = templates[i % len(templates)]
        a, b = fillers[i % len(fillers)], fillers[(3 * i + 1) % len(fillers)]
        prompts.append(template.format(a=a, b=b))
    return prompts


def build_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer with the ChatML special tokens and template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_micro_zoo(root: Path, seed: int = 0) -> MicroZoo:
    """Write a tiny base checkpoint and three random adapters under `root`.

    Args:
        root: an empty or missing directory.
        seed: makes weights and adapters reproducible.

    Returns:
        Where the base checkpoint and the adapter store were written.
    """
    torch.manual_seed(seed)
    base_dir, store_dir = root / "base", root / "adapters"
    corpus = [p for topic in _TOPICS for p in topic_prompts(topic, 60)]
    corpus += ["You are a helpful assistant.", "The answer is 42.", "Hello! How can I help?"]
    tokenizer = build_tokenizer(corpus)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        # Far above Llama's 0.02: attention must be peaked, or a wrong position or a mixed-up
        # KV row would hardly change a random model's output and tests could not see it.
        initializer_range=0.2,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    ids = []
    for index, (topic, (rank, alpha, targets, rslora)) in enumerate(
        zip(_TOPICS, _ADAPTER_SHAPES, strict=True)
    ):
        lora = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
            init_lora_weights=False, lora_dropout=0.0,
        )
        torch.manual_seed(seed + 1 + index)
        peft_model = get_peft_model(LlamaForCausalLM(config), lora)
        peft_model.base_model.model.load_state_dict(model.state_dict(), strict=False)
        out = store_dir / topic
        peft_model.save_pretrained(out, safe_serialization=True)
        (out / "README.md").unlink(missing_ok=True)
        _write_jsonl(out / "exemplars.jsonl", [{"text": p} for p in topic_prompts(topic, 50)])
        _write_jsonl(
            out / "eval.jsonl",
            [{"prompt": p, "answer": ""} for p in topic_prompts(topic, 20, offset=1000)],
        )
        ids.append(topic)
    return MicroZoo(base_dir=base_dir, store_dir=store_dir, adapter_ids=tuple(ids))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
