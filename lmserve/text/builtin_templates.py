"""llama.cpp's built-in chat templates (`--chat-template NAME`) as Jinja templates lmserve renders.

Each one writes what llama.cpp's llm_chat_apply_template (src/llama-chat.cpp) writes for its name,
character for character. One difference, on purpose: llama.cpp leaves the BOS token to its
tokenizer, lmserve's chat prompts are tokenized without special tokens (the template writes BOS,
as Hugging Face templates do). So the templates of families whose models begin with BOS (Llama,
Mistral, Gemma, DeepSeek, Command-R and their fine-tunes) open with `bos_token`; ChatML and Phi,
whose models add none, do not.

Names llama.cpp knows but that are not here are refused by name (see `builtin_template`).
"""

from __future__ import annotations

_BOS = "{{ bos_token or '' }}"


def _llama2(system_tags: bool, bos_in_history: bool, strip: bool) -> str:
    """llama2 and its variants: the system prompt inside <<SYS>> tags (or plain), BOS before each
    later turn, message text stripped."""
    content = "message['content']|trim" if strip else "message['content']"
    system = (r"'<<SYS>>\n' + content + '\n<</SYS>>\n\n'" if system_tags else r"content + '\n'")
    next_turn = "'<s>[INST] '" if bos_in_history else "'[INST] '"
    return (
        _BOS + "[INST] {% set ns = namespace(inside=true) %}{% for message in messages %}"
        f"{{% set content = {content} %}}"
        f"{{% if not ns.inside %}}{{% set ns.inside = true %}}{{{{ {next_turn} }}}}{{% endif %}}"
        f"{{% if message['role'] == 'system' %}}{{{{ {system} }}}}"
        "{% elif message['role'] == 'user' %}{{ content + ' [/INST]' }}"
        "{% else %}{{ content + '</s>' }}{% set ns.inside = false %}{% endif %}{% endfor %}"
    )


def _mistral(leading: str, trailing: str, trim_assistant: bool) -> str:
    """mistral-v1, -v3 and -v3-tekken: [INST] opens a turn, an assistant message closes it."""
    assistant = "message['content']|trim" if trim_assistant else "message['content']"
    return (
        _BOS + "{% set ns = namespace(inside=false) %}{% for message in messages %}"
        f"{{% if not ns.inside %}}{{{{ '{leading}[INST]{trailing}' }}}}{{% set ns.inside = true %}}{{% endif %}}"
        r"{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        f"{{% elif message['role'] == 'user' %}}{{{{ message['content'] + '{leading}[/INST]' }}}}"
        f"{{% else %}}{{{{ '{trailing}' + {assistant} + '</s>' }}}}{{% set ns.inside = false %}}{{% endif %}}"
        "{% endfor %}"
    )


def _mistral_v7(space: str) -> str:
    return (
        _BOS + "{% for message in messages %}"
        f"{{% if message['role'] == 'system' %}}"
        f"{{{{ '[SYSTEM_PROMPT]{space}' + message['content'] + '[/SYSTEM_PROMPT]' }}}}"
        f"{{% elif message['role'] == 'user' %}}{{{{ '[INST]{space}' + message['content'] + '[/INST]' }}}}"
        f"{{% else %}}{{{{ '{space}' + message['content'] + '</s>' }}}}{{% endif %}}{{% endfor %}}"
    )


def _role_turns(before_role: str, after_role: str, end: str, assistant_prompt: str, bos: str = "") -> str:
    """Every message as before_role + role + after_role + content + end, then the assistant's turn."""
    return (
        bos + "{% for message in messages %}"
        f"{{{{ '{before_role}' + message['role'] + '{after_role}' + message['content'] + '{end}' }}}}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ '{assistant_prompt}' }}}}{{% endif %}}"
    )


_LLAMA3 = (
    _BOS + "{% for message in messages %}"
    r"{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
    "+ message['content']|trim + '<|eot_id|>' }}"
    r"{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# google/gemma-7b-it: no system role; system text (stripped) opens the next user turn.
_GEMMA = (
    _BOS + "{% set ns = namespace(system='') %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = ns.system + message['content']|trim %}{% else %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    r"{{ '<start_of_turn>' + role + '\n' }}"
    r"{% if ns.system and role != 'model' %}{{ ns.system + '\n\n' }}{% set ns.system = '' %}{% endif %}"
    r"{{ message['content']|trim + '<end_of_turn>\n' }}{% endif %}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# mlabonne/AlphaMonarch-7B: BOS inside the history, before every message but the first.
_MONARCH = (
    _BOS + "{% for message in messages %}{% if not loop.first %}{{ '<s>' }}{% endif %}"
    r"{{ message['role'] + '\n' + message['content'] + '</s>\n' }}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<s>assistant\n' }}{% endif %}"
)

_OPENCHAT = (
    _BOS + "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ message['content'] + '<|end_of_turn|>' }}{% else %}"
    "{{ 'GPT4 Correct ' + message['role'][:1]|upper + message['role'][1:] + ': ' + message['content'] "
    "+ '<|end_of_turn|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'GPT4 Correct Assistant:' }}{% endif %}"
)


def _vicuna(system_prefix: str, system_end: str) -> str:
    return (
        _BOS + "{% for message in messages %}"
        f"{{% if message['role'] == 'system' %}}{{{{ '{system_prefix}' + message['content'] + '{system_end}' }}}}"
        r"{% elif message['role'] == 'user' %}{{ 'USER: ' + message['content'] + '\n' }}"
        r"{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'] + '</s>\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    )


_DEEPSEEK = (
    _BOS + "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}"
    r"{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n' }}"
    r"{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + '\n<|EOT|>\n' }}"
    r"{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)

_DEEPSEEK2 = (
    _BOS + r"{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    r"{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

_DEEPSEEK3 = (
    _BOS + r"{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)

_COMMAND_R_ROLES = "{'system': 'SYSTEM', 'user': 'USER', 'assistant': 'CHATBOT'}"
_COMMAND_R = (
    _BOS + f"{{% set tokens = {_COMMAND_R_ROLES} %}}{{% for message in messages %}}"
    "{% if message['role'] in tokens %}{{ '<|START_OF_TURN_TOKEN|><|' + tokens[message['role']] + '_TOKEN|>' "
    "+ message['content']|trim + '<|END_OF_TURN_TOKEN|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": _role_turns("<|im_start|>", r"\n", r"<|im_end|>\n", r"<|im_start|>assistant\n"),
    "command-r": _COMMAND_R,
    "deepseek": _DEEPSEEK,
    "deepseek2": _DEEPSEEK2,
    "deepseek3": _DEEPSEEK3,
    "gemma": _GEMMA,
    "llama2": _llama2(system_tags=False, bos_in_history=False, strip=False),
    "llama2-sys": _llama2(system_tags=True, bos_in_history=False, strip=False),
    "llama2-sys-bos": _llama2(system_tags=True, bos_in_history=True, strip=False),
    "llama2-sys-strip": _llama2(system_tags=True, bos_in_history=False, strip=True),
    "llama3": _LLAMA3,
    "mistral-v1": _mistral(leading=" ", trailing=" ", trim_assistant=False),
    "mistral-v3": _mistral(leading="", trailing=" ", trim_assistant=True),
    "mistral-v3-tekken": _mistral(leading="", trailing="", trim_assistant=False),
    "mistral-v7": _mistral_v7(" "),
    "mistral-v7-tekken": _mistral_v7(""),
    "monarch": _MONARCH,
    "openchat": _OPENCHAT,
    "phi3": _role_turns("<|", r"|>\n", r"<|end|>\n", r"<|assistant|>\n"),
    "phi4": _role_turns("<|im_start|>", "<|im_sep|>", "<|im_end|>", "<|im_start|>assistant<|im_sep|>"),
    "vicuna": _vicuna("", r"\n\n"),
    "vicuna-orca": _vicuna("SYSTEM: ", r"\n"),
    "zephyr": _role_turns("<|", r"|>\n", r"<|endoftext|>\n", r"<|assistant|>\n", bos=_BOS),
}


def builtin_template(name: str) -> str:
    """The Jinja template for llama.cpp's built-in template `name`; ValueError naming the ones
    lmserve has for any other."""
    try:
        return BUILTIN_TEMPLATES[name]
    except KeyError:
        raise ValueError(f"--chat-template {name!r} is not a template lmserve has; it has "
                         f"{', '.join(sorted(BUILTIN_TEMPLATES))} (or pass a Jinja template, or "
                         "--chat-template-file FILE)") from None
