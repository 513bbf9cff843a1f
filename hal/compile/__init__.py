"""The torch.compile room: a forward compiled once for every bucket, kept on disk for the next process.

``CompiledForward`` (with ``InductorBackend``, or the piecewise strategy's backend) compiles a forward once
with the token dimension symbolic; ``CompileStore`` keeps such a compile whole for a restart
(``stored_compile``); ``token_specialization`` says where model code fixed that dimension. Runners import
these by path; only ``TokenSpecializationError``, which a user may catch, is also on hal's face.
"""

from hal.compile.compiled_forward import CompiledForward, InductorBackend, RecompileError
from hal.compile.stored_compile import CompileStore
from hal.compile.token_specialization import TokenSpecializationError

__all__ = ["CompileStore", "CompiledForward", "InductorBackend", "RecompileError", "TokenSpecializationError"]
