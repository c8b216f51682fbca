"""sentence-transformers input module for NV-Embed-format models exported by megatron_nvembed.

Loaded by `SentenceTransformer(path, trust_remote_code=True)` through `modules.json`. Prompts
(`encode(..., prompt_name="query")`) become the NV-Embed instruction: tokenised as instruction +
text + EOS and left out of pooling exactly as `modeling_nvembed.NVEmbedModel.encode` does.
"""

from __future__ import annotations

from sentence_transformers.base.modules.input_module import InputModule

from .modeling_nvembed import NVEmbedModel


class NVEmbedSentenceTransformer(InputModule):
    """Wraps `NVEmbedModel` as a sentence-transformers module producing `sentence_embedding`."""

    config_keys = ["max_seq_length"]
    config_file_name = "nvembed_sentence_transformers_config.json"

    def __init__(self, model: NVEmbedModel, max_seq_length: int = 512):
        super().__init__()
        self.auto_model = model
        self.max_seq_length = max_seq_length

    @property
    def tokenizer(self):
        return self.auto_model.load_tokenizer()

    def preprocess(self, inputs, prompt: str | None = None, **kwargs):
        return self.auto_model.prepare_kwargs_from_batch(
            [str(t) for t in inputs], prompt or "", self.max_seq_length
        )

    def forward(self, features: dict, **kwargs) -> dict:
        out = self.auto_model(
            features["input_ids"], features["attention_mask"], features.get("pool_mask")
        )
        features["sentence_embedding"] = out["sentence_embeddings"]
        return features

    def get_sentence_embedding_dimension(self) -> int:
        return self.auto_model.config.hidden_size

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.auto_model.save_pretrained(output_path, safe_serialization=safe_serialization)
        self.save_config(output_path)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs):
        config = cls.load_config(model_name_or_path, subfolder=subfolder)
        model = NVEmbedModel.from_pretrained(model_name_or_path)
        return cls(model, **config)
