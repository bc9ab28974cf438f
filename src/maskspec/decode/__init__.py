from maskspec.decode.types import GenerationOutput, GenerationStats

__all__ = ["GenerationOutput", "GenerationStats"]
