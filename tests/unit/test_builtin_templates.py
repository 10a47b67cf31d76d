"""llama.cpp's built-in chat templates (--chat-template NAME) rendered by lmserve's Jinja.

Each expected prompt is what llama.cpp's llama_chat_apply_template writes for the conversation of
its tests/test-chat-template.cpp, taken from libllama at commit 0c1e570, with BOS written first
for the families whose models begin with it (llama.cpp leaves that to its tokenizer).
"""

import pytest

from lmserve.text.builtin_templates import BUILTIN_TEMPLATES, builtin_template
from lmserve.text.chat_template import compile_chat_template

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant"},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "Who are you"},
    {"role": "assistant", "content": "   I am an assistant   "},
    {"role": "user", "content": "Another question"},
]

EXPECTED = [
    ('chatml',
     ('<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n'
      'Hello<|im_end|>\n<|im_start|>assistant\nHi there<|im_end|>\n<|im_start|>user\n'
      'Who are you<|im_end|>\n<|im_start|>assistant\n   I am an assistant   <|im_end|>\n'
      '<|im_start|>user\nAnother question<|im_end|>\n<|im_start|>assistant\n')),
    ('command-r',
     ('<BOS><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>You are a helpful assistant<|END_OF_TURN_TOKEN|>'
      '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hello<|END_OF_TURN_TOKEN|>'
      '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Hi there<|END_OF_TURN_TOKEN|>'
      '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Who are you<|END_OF_TURN_TOKEN|>'
      '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>I am an assistant<|END_OF_TURN_TOKEN|>'
      '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Another question<|END_OF_TURN_TOKEN|>'
      '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>')),
    ('deepseek',
     ('<BOS>You are a helpful assistant### Instruction:\nHello\n### Response:\nHi there\n'
      '<|EOT|>\n### Instruction:\nWho are you\n### Response:\n   I am an assistant   \n'
      '<|EOT|>\n### Instruction:\nAnother question\n### Response:\n')),
    ('deepseek2',
     ('<BOS>You are a helpful assistant\n\nUser: Hello\n\n'
      'Assistant: Hi there<｜end▁of▁sentence｜>User: Who are you\n\n'
      'Assistant:    I am an assistant   <｜end▁of▁sentence｜>User: Another question\n\n'
      'Assistant:')),
    ('deepseek3',
     ('<BOS>You are a helpful assistant\n\n'
      '<｜User｜>Hello<｜Assistant｜>Hi there<｜end▁of▁sentence｜>'
      '<｜User｜>Who are you<｜Assistant｜>   I am an assistant   <｜end▁of▁sentence｜>'
      '<｜User｜>Another question<｜Assistant｜>')),
    ('gemma',
     ('<BOS><start_of_turn>user\nYou are a helpful assistant\n\nHello<end_of_turn>\n'
      '<start_of_turn>model\nHi there<end_of_turn>\n<start_of_turn>user\n'
      'Who are you<end_of_turn>\n<start_of_turn>model\nI am an assistant<end_of_turn>\n'
      '<start_of_turn>user\nAnother question<end_of_turn>\n<start_of_turn>model\n')),
    ('llama2',
     ('<BOS>[INST] You are a helpful assistant\nHello [/INST]Hi there</s>'
      '[INST] Who are you [/INST]   I am an assistant   </s>'
      '[INST] Another question [/INST]')),
    ('llama2-sys',
     ('<BOS>[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST]'
      'Hi there</s>[INST] Who are you [/INST]   I am an assistant   </s>'
      '[INST] Another question [/INST]')),
    ('llama2-sys-bos',
     ('<BOS>[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST]'
      'Hi there</s><s>[INST] Who are you [/INST]   I am an assistant   </s>'
      '<s>[INST] Another question [/INST]')),
    ('llama2-sys-strip',
     ('<BOS>[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST]'
      'Hi there</s>[INST] Who are you [/INST]I am an assistant</s>'
      '[INST] Another question [/INST]')),
    ('llama3',
     ('<BOS><|start_header_id|>system<|end_header_id|>\n\n'
      'You are a helpful assistant<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n'
      'Hello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHi there<|eot_id|>'
      '<|start_header_id|>user<|end_header_id|>\n\nWho are you<|eot_id|>'
      '<|start_header_id|>assistant<|end_header_id|>\n\nI am an assistant<|eot_id|>'
      '<|start_header_id|>user<|end_header_id|>\n\nAnother question<|eot_id|>'
      '<|start_header_id|>assistant<|end_header_id|>\n\n')),
    ('mistral-v1',
     ('<BOS> [INST] You are a helpful assistant\n\nHello [/INST] Hi there</s>'
      ' [INST] Who are you [/INST]    I am an assistant   </s>'
      ' [INST] Another question [/INST]')),
    ('mistral-v3',
     ('<BOS>[INST] You are a helpful assistant\n\nHello[/INST] Hi there</s>'
      '[INST] Who are you[/INST] I am an assistant</s>[INST] Another question[/INST]')),
    ('mistral-v3-tekken',
     ('<BOS>[INST]You are a helpful assistant\n\nHello[/INST]Hi there</s>'
      '[INST]Who are you[/INST]   I am an assistant   </s>[INST]Another question[/INST]')),
    ('mistral-v7',
     ('<BOS>[SYSTEM_PROMPT] You are a helpful assistant[/SYSTEM_PROMPT][INST] Hello[/INST]'
      ' Hi there</s>[INST] Who are you[/INST]    I am an assistant   </s>'
      '[INST] Another question[/INST]')),
    ('mistral-v7-tekken',
     ('<BOS>[SYSTEM_PROMPT]You are a helpful assistant[/SYSTEM_PROMPT][INST]Hello[/INST]'
      'Hi there</s>[INST]Who are you[/INST]   I am an assistant   </s>'
      '[INST]Another question[/INST]')),
    ('monarch',
     ('<BOS>system\nYou are a helpful assistant</s>\n<s>user\nHello</s>\n<s>assistant\n'
      'Hi there</s>\n<s>user\nWho are you</s>\n<s>assistant\n   I am an assistant   </s>'
      '\n<s>user\nAnother question</s>\n<s>assistant\n')),
    ('openchat',
     ('<BOS>You are a helpful assistant<|end_of_turn|>'
      'GPT4 Correct User: Hello<|end_of_turn|>'
      'GPT4 Correct Assistant: Hi there<|end_of_turn|>'
      'GPT4 Correct User: Who are you<|end_of_turn|>'
      'GPT4 Correct Assistant:    I am an assistant   <|end_of_turn|>'
      'GPT4 Correct User: Another question<|end_of_turn|>GPT4 Correct Assistant:')),
    ('phi3',
     ('<|system|>\nYou are a helpful assistant<|end|>\n<|user|>\nHello<|end|>\n'
      '<|assistant|>\nHi there<|end|>\n<|user|>\nWho are you<|end|>\n<|assistant|>\n'
      '   I am an assistant   <|end|>\n<|user|>\nAnother question<|end|>\n<|assistant|>\n')),
    ('phi4',
     ('<|im_start|>system<|im_sep|>You are a helpful assistant<|im_end|>'
      '<|im_start|>user<|im_sep|>Hello<|im_end|>'
      '<|im_start|>assistant<|im_sep|>Hi there<|im_end|>'
      '<|im_start|>user<|im_sep|>Who are you<|im_end|>'
      '<|im_start|>assistant<|im_sep|>   I am an assistant   <|im_end|>'
      '<|im_start|>user<|im_sep|>Another question<|im_end|>'
      '<|im_start|>assistant<|im_sep|>')),
    ('vicuna',
     ('<BOS>You are a helpful assistant\n\nUSER: Hello\nASSISTANT: Hi there</s>\n'
      'USER: Who are you\nASSISTANT:    I am an assistant   </s>\n'
      'USER: Another question\nASSISTANT:')),
    ('vicuna-orca',
     ('<BOS>SYSTEM: You are a helpful assistant\nUSER: Hello\nASSISTANT: Hi there</s>\n'
      'USER: Who are you\nASSISTANT:    I am an assistant   </s>\n'
      'USER: Another question\nASSISTANT:')),
    ('zephyr',
     ('<BOS><|system|>\nYou are a helpful assistant<|endoftext|>\n<|user|>\n'
      'Hello<|endoftext|>\n<|assistant|>\nHi there<|endoftext|>\n<|user|>\n'
      'Who are you<|endoftext|>\n<|assistant|>\n   I am an assistant   <|endoftext|>\n'
      '<|user|>\nAnother question<|endoftext|>\n<|assistant|>\n')),
]


@pytest.mark.parametrize("name, expected", EXPECTED)
def test_each_template_writes_what_llama_cpp_writes(name, expected):
    template = compile_chat_template(builtin_template(name))
    rendered = template.render(messages=CONVERSATION, add_generation_prompt=True, bos_token="<BOS>", eos_token="</s>")
    assert rendered == expected


def test_every_template_is_tested():
    assert sorted(BUILTIN_TEMPLATES) == sorted(name for name, _ in EXPECTED)


def test_a_model_without_bos_gets_none_written():
    template = compile_chat_template(builtin_template("llama3"))
    assert template.render(messages=CONVERSATION[1:2], add_generation_prompt=False, bos_token=None) == (
        "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>")


def test_an_unknown_name_is_refused_with_the_names_lmserve_has():
    with pytest.raises(ValueError) as refused:
        builtin_template("chatglm4")
    message = str(refused.value)
    assert "'chatglm4' is not a template lmserve has" in message and "chatml, command-r, deepseek" in message
