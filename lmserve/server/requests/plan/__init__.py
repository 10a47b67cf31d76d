"""Chat and text completion requests -> a GenerationPlan: prompt token ids and one SamplingParams per choice.

Every recognised request field is honoured here or refused with a 400 naming it. chat.py plans
chat completions; completion.py text completions and llama.cpp's /infill; both take the fields
they share from sampling_fields.py and make their choices with generation_plan.py.
"""

from lmserve.server.requests.plan.chat import chat_plan, chat_prompt_text, count_chat_tokens
from lmserve.server.requests.plan.completion import completion_plan, infill_plan
from lmserve.server.requests.plan.generation_plan import ChoicePlan, GenerationPlan
from lmserve.server.requests.plan.sampling_fields import base_params

__all__ = [
    "ChoicePlan",
    "GenerationPlan",
    "base_params",
    "chat_plan",
    "chat_prompt_text",
    "completion_plan",
    "count_chat_tokens",
    "infill_plan",
]
