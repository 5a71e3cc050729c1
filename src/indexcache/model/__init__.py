from .dsa import DSAForCausalLM, LayerRecord, Trace

__all__ = ["DSAForCausalLM", "LayerRecord", "Trace"]
