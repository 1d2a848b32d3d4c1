"""Generation engines behind one interface, with batching, resume, sharding and OOM back-off."""

from reflectevo.generation.engines import make_engine
from reflectevo.generation.requests import GenerationOutput, GenerationRequest, GenerationSettings

__all__ = ["GenerationOutput", "GenerationRequest", "GenerationSettings", "make_engine"]
