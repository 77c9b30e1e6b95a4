"""Text generation through an engine: the decode loop, sampling and length limits on the host, the
build's tokenizer read without transformers, focus on words, and at the top text in, text out from
a build folder. Imports no torch or transformers, so `aim generate` and a server's text endpoint run
where neither is installed.

    loop.py            generate(): prefill, then one token per step through the KV cache
    sampling.py        greedy, temperature and top-k on the redistributed logits
    limits.py          the engine's range and the model's positions, checked before any work
    text_tokenizer.py  a build's tokenizer.json through the `tokenizers` library
    focus.py           "+word=5,-other=10,+#123=4" as a focus vector over the vocabulary
    reference_runs.py  the loop on a build's reference prompts, for the text task's checks
    text.py            generate_text(folder, prompts): opens the build folder
"""

from aim.generation.focus import token_focus
from aim.generation.loop import Generation, generate, per_step
from aim.generation.text import generate_text, load_build

__all__ = ["Generation", "generate", "generate_text", "load_build", "per_step", "token_focus"]
