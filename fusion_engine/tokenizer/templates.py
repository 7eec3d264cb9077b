"""Chat templates by name, and mergekit's rule for ``chat_template:`` values.

A value is a template *name* when it is shorter than 256 characters without a newline or ``{``
(``auto``: the template most models' tokenizers carry); otherwise it is a literal Jinja template,
which must contain ``{`` and be at least 20 characters long.
"""

from __future__ import annotations

from collections import Counter

from ..errors import ConfigError

TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
        "{% endif %}"),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    "alpaca": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + "
        "'\\n\\n' }}{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + "
        "message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + "
        "eos_token }}{% else %}{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"),
}


def is_name(value: str) -> bool:
    return len(value) < 256 and "\n" not in value and "{" not in value


def resolve_chat_template(value: str, tokenizers=()) -> str:
    """The Jinja text for a ``chat_template:`` value (``tokenizers``: the models' tokenizers, for ``auto``)."""
    if value == "auto":
        found = [t.chat_template for t in tokenizers if isinstance(getattr(t, "chat_template", None), str)]
        if not found:
            raise ConfigError("chat_template: auto, but no model's tokenizer has a chat template "
                              f"(fix: name one of {', '.join(TEMPLATES)} or write the template)")
        return Counter(found).most_common(1)[0][0]
    if is_name(value):
        if value not in TEMPLATES:
            raise ConfigError(f"chat_template '{value}' is not a known template name (fix: use auto, one of "
                              f"{', '.join(TEMPLATES)}, or a literal Jinja template)")
        return TEMPLATES[value]
    if len(value) < 20 or "{" not in value:
        raise ConfigError(f"chat_template {value!r} is not a valid template")
    return value
