"""Custom prompts through both models and the crosscoder: per-token latents, and one latent's intervention.

A prompt is raw text or chat turns (rendered with the chat model's template, as the training data was, with
a generation prompt when the last turn is the user's); tokenised with one BOS like every training sequence.

- :meth:`OnlineSession.encode`: the paired residuals at the hooked layer, encoded with the inference threshold
  (BOS and padding never encoded): each token's strongest latents, and chosen latents' activations in context.
- :meth:`OnlineSession.intervene`: latent j ablated (``f_j -> 0``) or scaled (``f_j -> factor * f_j``) in the
  base model, the chat model or both: model m's layer output gets ``(factor - 1) * f_j * W_dec[j, m]`` added
  at every position (raw units; ``f_j`` from the clean paired residuals, as the causal analysis does), and
  the rest of the model runs on it. Reported: the next-token distribution after the prompt before and
  after (top tokens) and ``KL(before || after)`` per model.

Every prompt is bounded (characters, turns, tokens, chosen latents): a `PromptError` names the limit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jinja2 import TemplateError

from crosscoder_pl.analysis.probes import final_hidden, head_logprobs, kl_per_position
from crosscoder_pl.config import ServerSettings
from crosscoder_pl.crosscoder import CrossCoder
from crosscoder_pl.data.activations import position_ids, token_mask
from crosscoder_pl.hooks import residual_at
from crosscoder_pl.names import MODELS

ROLES = ("system", "user", "assistant")


class PromptError(ValueError):
    """A request the app refuses; the message says which limit or value, and is shown to the user."""


@dataclass(frozen=True)
class Prompt:
    """Exactly one of ``text`` (raw) and ``messages`` (``[{"role", "content"}]``, chat template applied)."""

    text: str | None = None
    messages: Sequence[dict[str, str]] | None = None


class OnlineSession:
    """A loaded crosscoder and model pair answering prompts, one at a time (a lock: the CPU is shared).

    Args:
        crosscoder: folded, eval mode, calibrated threshold (``CrossCoder.from_pretrained`` gives one).
        pair: ``base``, ``chat``, ``tokenizer``, ``layer`` (`crosscoder_pl.models.pair.ModelPair`).
    """

    def __init__(self, crosscoder: CrossCoder, pair: Any, settings: ServerSettings) -> None:
        if crosscoder.training or not crosscoder.encodes_alone:
            raise ValueError("the online session needs an eval-mode crosscoder with a calibrated threshold")
        self.crosscoder = crosscoder
        self.pair = pair
        self.settings = settings
        self.lock = threading.Lock()
        self.device = next(pair.base.parameters()).device

    # ---------------------------------------------------------------------------------------- prompts
    def render(self, prompt: Prompt) -> str:
        """The text the models read (before the tokenizer's BOS)."""
        s = self.settings
        if (prompt.text is None) == (prompt.messages is None):
            raise PromptError("give exactly one of 'text' (raw) and 'messages' (chat turns)")
        if prompt.text is not None:
            if len(prompt.text) > s.max_text_chars:
                raise PromptError(f"the text has {len(prompt.text)} characters; the limit is {s.max_text_chars} "
                                  "(dashboard.server.max_text_chars)")
            if not prompt.text.strip():
                raise PromptError("the text is empty")
            return prompt.text
        messages = list(prompt.messages)
        if not messages or len(messages) > s.max_messages:
            raise PromptError(f"{len(messages)} chat turns; give 1 to {s.max_messages} (dashboard.server.max_messages)")
        if sum(len(m["content"]) for m in messages) > s.max_text_chars:
            raise PromptError(f"the turns have more than {s.max_text_chars} characters in all "
                              "(dashboard.server.max_text_chars)")
        bad = [m["role"] for m in messages if m["role"] not in ROLES]
        if bad:
            raise PromptError(f"unknown role {bad[0]!r}: use one of {ROLES}")
        tokenizer = self.pair.tokenizer
        try:
            text = tokenizer.apply_chat_template(
                [{"role": m["role"], "content": m["content"]} for m in messages], tokenize=False,
                add_generation_prompt=messages[-1]["role"] == "user",
            )
        except TemplateError as error:
            raise PromptError(f"the chat template refused these turns: {error}") from error
        return text.removeprefix(tokenizer.bos_token or "")  # the tokenizer adds the one BOS

    def tokenize(self, prompt: Prompt) -> torch.Tensor:
        """``input_ids [1, seq]``, BOS first; at most ``max_prompt_tokens``."""
        ids = self.pair.tokenizer(self.render(prompt), return_tensors="pt")["input_ids"]
        limit = self.settings.max_prompt_tokens
        if ids.shape[1] > limit:
            raise PromptError(f"the prompt is {ids.shape[1]} tokens long; the limit is {limit} "
                              "(dashboard.server.max_prompt_tokens)")
        if ids.shape[1] < 2:
            raise PromptError("the prompt has no token after BOS")
        return ids

    def check_latents(self, latents: Sequence[int]) -> list[int]:
        n = self.crosscoder.n_latents
        if len(latents) > self.settings.max_chosen_latents:
            raise PromptError(f"{len(latents)} latents asked; the limit is {self.settings.max_chosen_latents} "
                              "(dashboard.server.max_chosen_latents)")
        bad = [j for j in latents if not 0 <= j < n]
        if bad:
            raise PromptError(f"latent {bad[0]} does not exist: this dictionary has latents 0..{n - 1}")
        return list(latents)

    # ----------------------------------------------------------------------------------- computations
    def _codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Eval-mode codes ``[seq, F]`` of the prompt (zero at BOS)."""
        mask = torch.ones_like(ids)
        inputs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
                  "position_ids": position_ids(mask).to(self.device)}
        models = (self.pair.base, self.pair.chat)
        residual = torch.stack([residual_at(m, self.pair.layer, **inputs) for m in models], dim=2)  # [1, seq, 2, d]
        codes = self.crosscoder.encode(residual[0].to(self.crosscoder.W_enc))  # [seq, F]
        keep = token_mask(ids, mask, self.pair.tokenizer.bos_token_id)[0].to(codes.device)
        return torch.where(keep[:, None], codes, 0.0).float()

    def token_texts(self, ids: torch.Tensor) -> list[str]:
        return [self.pair.tokenizer.decode([i]) for i in ids.tolist()]

    @torch.inference_mode()
    def encode(self, prompt: Prompt, latents: Sequence[int] = ()) -> dict[str, Any]:
        """``tokens``, ``top_latents`` (per token ``[[latent, activation], ...]``, strongest first, positive only)
        and ``latents`` (``{str(j): [activation per token]}``) of the prompt; ``seconds`` it took."""
        start = time.perf_counter()
        ids = self.tokenize(prompt)
        chosen = self.check_latents(latents)
        with self.lock:
            codes = self._codes(ids).cpu()
        values, where = codes.topk(min(self.settings.top_latents, codes.shape[1]), dim=-1)
        top = [[[j, v] for j, v in zip(w, vals) if v > 0] for w, vals in zip(where.tolist(), values.tolist())]
        return {
            "tokens": self.token_texts(ids[0]),
            "token_ids": ids[0].tolist(),
            "top_latents": top,
            "latents": {str(j): codes[:, j].tolist() for j in chosen},
            "seconds": time.perf_counter() - start,
        }

    @torch.inference_mode()
    def intervene(
        self, prompt: Prompt, latent: int, model: Literal["base", "chat", "both"], mode: Literal["ablate", "scale"],
        factor: float = 0.0,
    ) -> dict[str, Any]:
        """Next-token distribution after the prompt, per model, before and after editing ``latent`` (module doc)."""
        start = time.perf_counter()
        if model not in (*MODELS, "both"):
            raise PromptError(f"model={model!r}: use 'base', 'chat' or 'both'")
        if mode not in ("ablate", "scale"):
            raise PromptError(f"mode={mode!r}: use 'ablate' or 'scale'")
        if mode == "scale" and not abs(factor) <= self.settings.max_factor:
            raise PromptError(f"factor={factor}: |factor| must be at most {self.settings.max_factor} "
                              "(dashboard.server.max_factor)")
        (j,) = self.check_latents([latent])
        ids = self.tokenize(prompt)
        multiplier = 0.0 if mode == "ablate" else float(factor)
        mask = torch.ones_like(ids)
        with self.lock:
            f = self._codes(ids)[:, j]  # [seq]
            decoder = self.crosscoder.decoder(normalised=False)[j].detach()  # [2, d] raw units
            answers = {}
            for m, name in enumerate(MODELS):
                lm = (self.pair.base, self.pair.chat)[m]
                edited = model in (name, "both")
                clean = head_logprobs(lm, final_hidden(lm, self.pair.layer, ids, mask, lambda h: h)[0, -1:])[0]
                after = clean
                if edited:
                    delta = ((multiplier - 1.0) * f[:, None] * decoder[m]).to(self.device)  # [seq, d]
                    hidden = final_hidden(lm, self.pair.layer, ids, mask, lambda h: h + delta.to(h.dtype))
                    after = head_logprobs(lm, hidden[0, -1:])[0]
                answers[name] = {
                    "edited": edited,
                    "kl": float(kl_per_position(clean, after)),
                    "before": self._top_tokens(clean),
                    "after": self._top_tokens(after),
                }
        fired = int((f > 0).sum())
        action = "ablated" if mode == "ablate" else f"scaled by {multiplier:g}"
        where = "both models" if model == "both" else f"the {model} model"
        return {
            "models": answers,
            "latent": j,
            "fired_positions": fired,
            "n_positions": int(ids.shape[1]),
            "activation_last": float(f[-1]),
            "description": f"latent {j} {action} in {where}; it fires at {fired} of {ids.shape[1]} positions "
                           f"(last token: {float(f[-1]):.3g})",
            "seconds": time.perf_counter() - start,
        }

    def _top_tokens(self, logprobs: torch.Tensor) -> list[list[Any]]:
        values, ids = logprobs.float().exp().topk(self.settings.top_next_tokens)
        return [[self.pair.tokenizer.decode([i]), p] for i, p in zip(ids.tolist(), values.tolist())]
