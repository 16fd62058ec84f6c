"""Loading straight into the stored form (qwennb.loading), on the CPU with the tiny model's classes."""

import torch

from qwennb.loading import build_synthetic_transformer, load_transformer, pack_in_place, pin_in_place
from qwennb.speed import FP8Linear, FP8WeightLinear, _quantize_rows
from qwennb.stand_ins import build_synthetic_pipeline, build_tiny_pipeline


def _saved(tmp_path):
    t = build_tiny_pipeline(seed=3).transformer
    t.save_pretrained(tmp_path / "transformer", max_shard_size="40KB")  # several shards: blocks cross them
    return t


def test_load_in_the_load_dtype_equals_the_saved_weights(tmp_path):
    ref = _saved(tmp_path)
    assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 1
    got = load_transformer(tmp_path, torch.float32, fp8=False)
    want = ref.state_dict()
    assert set(got.state_dict()) == set(want)
    for k, v in got.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_fp8_load_quantises_each_block_as_the_fast_path_does(tmp_path):
    ref = _saved(tmp_path)
    got = load_transformer(tmp_path, torch.float32, fp8=True)
    for b_ref, b in zip(ref.transformer_blocks, got.transformer_blocks, strict=True):
        mlp = b.img_mlp.net[2]
        assert type(mlp) is FP8Linear and type(b.img_mod[1]) is FP8WeightLinear
        q, scale = _quantize_rows(b_ref.img_mlp.net[2].weight)
        assert torch.equal(mlp.weight_fp8.view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(mlp.weight_scale, scale.t())
        assert not any(type(m) is torch.nn.Linear for m in b.modules())  # no bf16 copy of any block Linear
    assert torch.equal(got.img_in.weight, ref.img_in.weight)  # outside the blocks: as saved


def test_layerwise_fp8_load_stores_block_linears_in_fp8(tmp_path):
    _saved(tmp_path)
    got = load_transformer(tmp_path, torch.float32, fp8=False, layerwise_fp8=True)
    dtypes = {
        m.weight.dtype for b in got.transformer_blocks for m in b.modules() if type(m) is torch.nn.Linear
    }
    assert dtypes == {torch.float8_e4m3fn} and got.img_in.weight.dtype == torch.float32


def test_synthetic_block_by_block_equals_the_whole_build():
    whole = build_synthetic_pipeline("cpu", torch.float32, config_dir="tiny", seed=7).transformer
    blocks = build_synthetic_transformer("tiny", torch.float32, seed=7)
    w = whole.state_dict()
    for k, v in blocks.state_dict().items():
        assert torch.equal(v, w[k]), k
    fp8 = build_synthetic_transformer("tiny", torch.float32, fp8=True, seed=7)
    q, _ = _quantize_rows(whole.transformer_blocks[1].txt_mlp.net[2].weight)
    assert torch.equal(
        fp8.transformer_blocks[1].txt_mlp.net[2].weight_fp8.view(torch.uint8), q.view(torch.uint8)
    )


def test_pack_in_place_keeps_values_and_shares_one_buffer():
    block = build_tiny_pipeline(seed=1).transformer.transformer_blocks[0]
    before = {k: v.clone() for k, v in block.state_dict().items()}
    buf = pack_in_place(block)
    total = sum(p.numel() * p.element_size() for p in block.parameters())
    assert (
        total <= buf.numel() <= total + 64 * len(list(block.parameters())) + 64 * len(list(block.buffers()))
    )
    for k, v in block.state_dict().items():
        assert torch.equal(v, before[k]), k
        if v.numel():
            assert v.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
    assert pin_in_place([block]) == 0.0  # no CUDA here: nothing is page-locked


def test_a_saved_small_pipeline_is_planned_from_its_folder_and_runs_on_the_cpu(tmp_path):
    """A small model of Qwen-Image's classes saved with save_pretrained is planned from its own configs (not as
    the 54 GiB qwen-image, which a CPU refuses) and loads and generates there."""
    from qwennb.plan import describe_machine
    from qwennb.session import Session

    build_tiny_pipeline(seed=4).save_pretrained(tmp_path)
    session = Session(_hardware=describe_machine(host_ram_gb=8))
    plan = session.plan_for(str(tmp_path))
    assert plan.device == "cpu" and plan.source == str(tmp_path.resolve())
    assert plan.components["transformer"].host_gb == 0.0 and plan.estimated_host_ram_gb < 3
    report = session.load(str(tmp_path))
    assert report.plan.source == str(tmp_path.resolve())
    result = session.generate("a red fox", steps=2, width=64, height=64, seed=1)
    assert len(result.step_times_s) == 2 and result.images[0].size == (64, 64)


def test_synthetic_stand_ins_build_their_transformer_in_the_stored_form(monkeypatch):
    """A capped plan for a synthetic stand-in draws its transformer block by block into the stored form (as real
    weights load), from the stand-in's own configs, and hands it to the pipeline: for the edit stand-in too (drawn
    whole in bf16 first, a 24 GB edit plan held 54.6 GB of host RAM on an H200)."""
    from qwennb import loading, pipeline, stand_ins
    from qwennb.plan import describe_machine, make_plan

    built = []

    def fake_transformer(config_dir, **kw):  # the real one draws 20 B parameters; here: what it was asked
        built.append((config_dir, kw))
        return f"stored transformer of {config_dir}"

    received = {}

    def pipeline_of(name):
        def build(**kw):
            received[name] = kw
            return name

        return build

    monkeypatch.setattr(loading, "build_synthetic_transformer", fake_transformer)
    monkeypatch.setattr(stand_ins, "build_synthetic_edit_pipeline", pipeline_of("edit"))
    monkeypatch.setattr(stand_ins, "build_synthetic_pipeline", pipeline_of("generate"))
    machine = describe_machine(gpu_memory_gb=24, compute_capability="9.0", host_ram_gb=64)
    for model, config, kind in (
        ("qwen-image-edit-synthetic", "qwen-image-edit-2511", "edit"),
        ("qwen-image-synthetic", "qwen-image", "generate"),
    ):
        plan = make_plan(machine, model)
        assert plan.fp8_matmul and pipeline._stored_form(plan), plan.arrangement
        assert pipeline._build_stand_in(plan) == kind
        assert built[-1][0] == config and built[-1][1]["fp8"] is True
        assert received[kind]["transformer"] == f"stored transformer of {config}"
        assert received[kind]["config_dir"] == config
