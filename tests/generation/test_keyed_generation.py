"""Text generation at a tier with keyed noise: the same prompt gives the same greedy text every time,
alone or in a left-padded batch beside other prompts."""

import numpy as np

from aim.generation import generate, generate_text, load_build

PROMPTS = [[5, 900, 17, 4242, 31000, 77, 12], [18, 2], [400, 401, 402, 403]]
UTILITY = 0.05  # the tiny model's logits spread ~0.16: this changes tokens


def test_the_same_prompt_gives_the_same_greedy_text_alone_and_in_a_padded_batch(keyed_build):
    engine, tokenizer, manifest = load_build(keyed_build("llama").folder)
    alone = [generate(engine, [prompt], utility=UTILITY, max_new_tokens=12).tokens[0] for prompt in PROMPTS]
    assert all(
        np.array_equal(generate(engine, [p], utility=UTILITY, max_new_tokens=12).tokens[0], a)
        for p, a in zip(PROMPTS, alone)
    )
    for order in ([0, 1, 2], [2, 0, 1]):
        batch = generate(engine, [PROMPTS[i] for i in order], utility=UTILITY, max_new_tokens=12).tokens  # left-padded
        for row, index in enumerate(order):
            np.testing.assert_array_equal(batch[row], alone[index])
    clean = generate(engine, PROMPTS, utility=0.0, max_new_tokens=12).tokens
    assert any(not np.array_equal(c, a) for c, a in zip(clean, alone))  # the tier does change the text
    texts = [generate_text(manifest.folder, ["def main():"], utility=UTILITY, max_new_tokens=8)[0][0] for _ in range(2)]
    assert texts[0] == texts[1]
