"""Defaults shared by every mode. Each mode file (sft.py, ppo.py, ...) starts from `get_config()` here."""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.mode = ""  # set by the mode file: "sft", "ppo", ...
    c.seed = 0
    # Many hosts (diffchat_jax/utils/distributed.py; README "Many hosts"): one process per host on JAX's
    # multi-controller runtime. Empty fields are detected on SLURM, Open MPI and TPU pods; elsewhere set all three.
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # HOST:PORT of process 0 (it serves there); "" = detect
    c.distributed.num_processes = 0  # 0 = detect (one process when no cluster is detected); 1 = off
    c.distributed.process_id = -1  # this process, 0 .. num_processes - 1; -1 = detect
    c.distributed.detect = "auto"  # "auto", "off", or a jax cluster_detection_method ("slurm", "ompi", "mpi4py")
    c.distributed.initialization_timeout_s = 300  # stop when not every process has joined by then
    c.distributed.heartbeat_timeout_s = 100  # jax ends the job this long after a process was lost
    c.distributed.log_all_processes = False  # False: only process 0 prints (errors always reach stderr)
    # The device mesh (diffchat_jax/utils/mesh.py): batches split over every device; params and optimizer state
    # replicated (fsdp 1) or split over groups of `fsdp` devices (GSPMD), for models that do not fit replicated.
    c.mesh = ml_collections.ConfigDict({"fsdp": 1})
    # Stop at start-up when XLA's estimate of the peak memory per device (printed by every trainer; also
    # `python -m diffchat_jax.memory`) exceeds this many GiB; 0 = no check.
    c.memory_limit_gib = 0.0

    c.model = ml_collections.ConfigDict()
    # A transformers BLOOM checkpoint: hub id or local folder (config.json + safetensors). Empty with
    # `model.random` set = a randomly initialised model of that shape (tiny configs, tests).
    c.model.name_or_path = "bigscience/bloom-1b1"
    c.model.random = ml_collections.ConfigDict({"n_layer": 0, "hidden_size": 0, "n_head": 0})
    c.model.compute_dtype = "bfloat16"  # activations; "float32" or "bfloat16" (the paper trains in bf16)
    c.model.param_dtype = "float32"  # master weights stay fp32 for AdamW updates
    c.model.remat = False  # recompute each block in the backward pass (saves memory on 1B+ models)

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.name_or_path = ""  # empty = the model's own tokenizer
    # > 0: train a byte-level BPE of this vocabulary size on the training data and save it in the workdir
    # (tiny configs; no download needed).
    c.tokenizer.train_vocab_size = 0

    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # InstructPE / InstructPix2Pix file (.json/.jsonl/.csv/.parquet) or hub dataset id
    c.data.eval = ""  # optional separate eval file; empty = hold out `eval_fraction` of train
    c.data.eval_fraction = 0.02
    c.data.max_length = 384
    c.data.max_chars = 2000  # rows with a longer field are bad rows
    c.data.on_bad_row = "skip"  # "skip" (count and report) or "error" (stop at the first bad row)

    c.log_every = 10
    c.eval_every = 200
    c.checkpoint_every = 500
    c.keep_checkpoints = 3

    # Content integrity (paper Listing 1): the CI reward, VCI's prefix CI and ADM's keywords. The decisions behind
    # these knobs are documented in diffchat_jax/text/keywords.py and integrity.py.
    c.ci = ml_collections.ConfigDict()
    c.ci.threshold = 0.7  # CI below it rewards 0; evaluation reports CI before thresholding
    # Penn tags whose words are keywords: nouns (incl. proper), adjectives, verbs (auxiliaries never count).
    c.ci.candidate_pos = ("NN", "NNS", "NNP", "NNPS", "JJ", "JJR", "JJS", "VB", "VBD", "VBG", "VBN", "VBP", "VBZ")
    c.ci.stop_list = True  # drop prompt boilerplate ("highly detailed", "8k", "artstation") from the keywords
    c.ci.tagger = "auto"  # "auto" (nltk perceptron if its data is installed, else "pattern"), "perceptron", "pattern"

    # ADM pi- (paper section 3.3): keyword removal / replacement plans for hard negatives (diffchat_jax/text/adm.py).
    c.adm = ml_collections.ConfigDict()
    c.adm.negative_fraction = 0.04  # probability that a sample becomes a negative
    c.adm.remove_prob = 0.5  # per picked keyword: remove, else replace by a same-POS non-synonym keyword
    c.adm.keywords_per_negative = 1
    c.adm.max_sequences = 8  # K: ban / steer rows per sample (a keyword has up to ~6 spellings)
    c.adm.max_tokens = 8  # L: tokens per row; longer spellings are not planned

    # The sampler (diffchat_jax/sampling/rollout.py: rollout.SamplingConfig.from_config(c.sampling, eos_id, pad_id)).
    c.sampling = ml_collections.ConfigDict()
    c.sampling.max_new_tokens = 128
    c.sampling.min_new_tokens = 0  # EOS is removed before this many tokens
    c.sampling.greedy = False  # argmax instead of a draw; the warpers (temperature .. typical) are then skipped
    c.sampling.temperature = 1.0
    c.sampling.top_k = 0  # 0 = off
    c.sampling.top_p = 1.0  # 1 = off
    # ADM pi+: locally typical sampling with this mass for every sample that is not a pi- negative; 1 = off.
    c.sampling.typical_mass = 0.97
    # Transform order (all six names): transformers' processors, then its warpers in its order.
    c.sampling.order = ("min_new_tokens", "ban", "temperature", "top_k", "top_p", "typical")

    # Rewards (diffchat_jax/rewards/): components by name with weights, then normalisation and clipping.
    c.reward = ml_collections.ConfigDict()
    c.reward.components = ml_collections.ConfigDict({"ci": 1.0})  # name -> weight; "aesthetic", "pickscore" need images
    c.reward.normalize = "scale"  # "none", "scale" (divide by the running std) or "standardize"
    c.reward.clip = 10.0  # after normalising; 0 = none
    c.reward.on_nonfinite = "error"  # "error" (stop, naming the sample) or "mask" (drop such samples)
    # LAION aesthetic predictor (sac+logos+ava1-l14-linearMSE) on CLIP ViT-L/14 image embeddings; a local path works.
    c.reward.aesthetic = ml_collections.ConfigDict(dict(
        clip_model="openai/clip-vit-large-patch14",
        mlp_weights="trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth",
        dtype="float32", batch_size=64))
    c.reward.pickscore = ml_collections.ConfigDict(dict(
        model="yuvalkirstain/PickScore_v1",
        processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",  # tokenizer source; "" = the model folder
        dtype="float32", batch_size=64))

    # Rendering the responses for the image rewards (diffchat_jax/diffusion/): an SD 1.x pipeline in the diffusers
    # layout (folder or hub id) or a single-file LDM checkpoint (.safetensors/.ckpt, e.g. from Civitai).
    c.render = ml_collections.ConfigDict(dict(
        model="stable-diffusion-v1-5/stable-diffusion-v1-5",  # the paper's reward renderer (SD 1.5)
        config_from="",  # single files only: a diffusers pipeline with the configs + tokenizer ("" = SD 1.5's)
        solver="dpmpp_2m",  # "ddim", "dpmpp_2m" (DPM-Solver++ 2M) or "euler_ancestral"
        num_steps=20,
        guidance_scale=7.5,  # classifier-free guidance; <= 1 turns it off
        negative_prompt="",
        height=0, width=0,  # 0 = the model's native size (512 for SD 1.5)
        images_per_prompt=1,  # a response's image rewards are the mean over its images
        seed=0,
        # "fixed": image n of every response starts from seed + n, every iteration (the paper's fixed seeds: the
        # rewards of two prompts compare them on the same noise); "per_iteration": fresh seeds each iteration.
        seed_policy="fixed",
        dtype="float32",  # "bfloat16" on accelerators (params and compute; norms and softmax stay float32)
        batch_size=8,  # prompts per jitted call (rounded up to a multiple of the local device count)
        log_every=10,  # iterations between logged image grids (TensorBoard + PNG files); 0 = never
        log_images=8))  # responses in a logged grid (their first image each)
    return c
