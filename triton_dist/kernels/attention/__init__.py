"""The attention family: shared tiles (``_common``), local decode (``flash_decode``) and prefill (``flash_attn``)
kernels, and the distributed forms built on them (``sp_flash_decode``, ``sp_ag_attention``, ``ulysses``)."""
