"""Test-session set-up shared by every test file.

Triton kernels run on CPU tensors under Triton's interpreter, which triton reads when it is
first imported: set it before anything (torch.compile included) can import triton.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
