#!/usr/bin/env bash
# The Shapes world v2, end to end on the CPU, as it was run for EVIDENCE.md (2 cores; each step resumable
# or short). Steps: 1 fine-tune v1's UNet with the "words" text encoder and the word-grounding loss; 2 the diagnostics on it; 3 gates and the control on it; 4 the study.
#   bash scripts/shapes_v2.sh base|shapes|longer|nouns|soften|temper|diagnose|gates|install|study
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
out=output
mkdir -p "$out"
v2="$out/shapes_base_v2.safetensors"  # the committed base v2 (commit 60a5b5e), where the stages that start from it read it
fetch_v2() { [ -f "$v2" ] || git show 60a5b5e:maskattn_shapes/weights/shapes_base.safetensors > "$v2"; }
finetune() {  # finetune OUT INIT SEED MINUTES [FLAGS...]: one stage of v2's fine-tuning recipe (MINUTES overrides the time)
  local dir="$1" init="$2" seed="$3" minutes="$4"; shift 4
  $py -m maskattn_shapes.train_base --text-encoder words --grounding 0.5 "$@" \
    --out "$dir" --init "$init" --scenes 8000 --steps 3000 --batch 32 --lr 2e-4 \
    --warmup 50 --ema 0.998 --save-every 100 --seed "$seed" --minutes "${MINUTES:-$minutes}" ${RESUME:+--resume}
}
case "${1:-}" in
  base)  # v1's UNet (git show 2611916:maskattn_shapes/weights/shapes_base.safetensors) fine-tuned with the "words"
    # text encoder (no attention: padding, start and end the same for every prompt; pooled vector 0) and the
    # word-grounding loss (maskattn_shapes/grounding.py); RESUME=1 continues a stop, MINUTES caps the time
    git show 2611916:maskattn_shapes/weights/shapes_base.safetensors > "$out/shapes_base_v1.safetensors"
    $py -m maskattn_shapes.train_base --text-encoder words --grounding 0.5 --out "$out/shapes_v2" \
      --init "$out/shapes_base_v1.safetensors" --scenes 8000 --steps 3000 --batch 32 --lr 3e-4 --warmup 50 \
      --ema 0.998 --save-every 100 --minutes "${MINUTES:-55}" ${RESUME:+--resume}
    ;;
  shapes)  # base v2.1 (measured in EVIDENCE.md, not committed): base v2 fine-tuned on with colour-word dropout (train_base --drop-colours:
    # 30 % of captions name some objects by their shape alone), two stages (30 and 35 minutes of training); STAGE=1|2,
    # RESUME=1 continues a stopped stage
    case "${STAGE:-1}" in
      1) fetch_v2; finetune "$out/shapes_v2_1_stage1" "$v2" 0 30 --drop-colours 0.3 ;;
      2) finetune "$out/shapes_v2_1_stage2" "$out/shapes_v2_1_stage1/shapes_base.safetensors" 1 35 --drop-colours 0.3 ;;
      *) echo "STAGE must be 1 or 2" >&2; exit 2 ;;
    esac
    ;;
  longer)  # base v2.2: base v2 trained on longer WITHOUT colour-word dropout (v2.1's recipe otherwise), STAGE=1 (25 min,
    # seed 0: v2.1's control) then 2 (35 min from stage 1, seed 1); RESUME=1 continues a stopped stage
    case "${STAGE:-1}" in
      1) fetch_v2; finetune "$out/shapes_v2_2_stage1" "$v2" 0 25 ;;
      2) finetune "$out/shapes_v2_2_stage2" "$out/shapes_v2_2_stage1/shapes_base.safetensors" 1 35 ;;
      *) echo "STAGE must be 1 or 2" >&2; exit 2 ;;
    esac
    ;;
  nouns)  # base v2.3: base v2.2 (stage 2) trained on with the grounding loss on the shape words only (train_base
    # --ground-nouns: nothing tells a colour word which object is its own), STAGE=1 (30 min, seed 2) then 2 (30 min from
    # stage 1, seed 3); RESUME=1 continues a stopped stage
    case "${STAGE:-1}" in
      1) finetune "$out/shapes_v2_3" "$out/shapes_v2_2_stage2/shapes_base.safetensors" 2 30 --ground-nouns ;;
      2) finetune "$out/shapes_v2_3_stage2" "$out/shapes_v2_3/shapes_base.safetensors" 3 30 --ground-nouns ;;
      *) echo "STAGE must be 1 or 2" >&2; exit 2 ;;
    esac
    ;;
  soften)  # base v2.4: base v2.3 (stage 2) trained on with the saturation loss (train_base --max-weight CAP: each head's
    # largest attention weight above CAP is penalised; v2.3's heads put 0.97 on one token): STAGE=1 (20 min, seed 4, cap
    # 0.8), 2 (30 min from stage 1, seed 5, cap 0.83), 3 (30 min from stage 2, seed 6, cap 0.85, colour-word dropout
    # 0.3 as in v2.1: the shape word alone must carry its shape); RESUME=1 continues a stopped stage
    case "${STAGE:-1}" in
      1) finetune "$out/shapes_v2_4" "$out/shapes_v2_3_stage2/shapes_base.safetensors" 4 20 --ground-nouns --max-weight 0.8 ;;
      2) finetune "$out/shapes_v2_4_stage2" "$out/shapes_v2_4/shapes_base.safetensors" 5 30 --ground-nouns --max-weight 0.83 ;;
      3) finetune "$out/shapes_v2_4_stage3" "$out/shapes_v2_4_stage2/shapes_base.safetensors" 6 30 --ground-nouns \
           --max-weight 0.85 --drop-colours 0.3 ;;
      *) echo "STAGE must be 1, 2 or 3" >&2; exit 2 ;;
    esac
    ;;
  temper)  # base v2.5, the committed base: base v2.3 (stage 2) with every cross-attention logit x 0.25 (maskattn_shapes.temper)
    $py -m maskattn_shapes.temper "$out/shapes_v2_3_stage2/shapes_base.safetensors" 0.25 "$out/shapes_v2_5/shapes_base.safetensors"
    ;;
  diagnose)
    $py -m maskattn_shapes.diagnose --weights "$out/shapes_v2/shapes_base.safetensors" --per-kind 40 --json "$out/diagnose_v2.json"
    $py -m maskattn_shapes.diagnose --weights "$out/shapes_base_v1.safetensors" --per-kind 40 --json "$out/diagnose_v1.json"
    if [ -f "$out/shapes_v2_1_stage2/shapes_base.safetensors" ]; then  # after "shapes"
      $py -m maskattn_shapes.diagnose --weights "$out/shapes_v2_1_stage2/shapes_base.safetensors" --per-kind 40 \
        --json "$out/diagnose_v2_1.json"
    fi
    ;;
  gates)  # issue 17's variants on base v2 (which must be the pack's base: the trainer's --checkpoint maskattn-shapes),
    # same data, steps and seed; SEED=1 for a second seed, ONLY="name ..." for some of them
    [ -d "$out/world_v2" ] || $py -m maskattn_shapes.world "$out/world_v2" --n 1200 --seed 0
    seed="${SEED:-0}"
    common=(--checkpoint maskattn-shapes --data "$out/world_v2" --resolution 128 --batch-size 8 --grad-accum 1
            --lr 3e-4 --warmup-steps 30 --steps "${STEPS:-600}" --seed "$seed" --cpu --no-install)
    run() {  # run NAME FLAGS...: one variant, skipped when ONLY is set and does not name it
      local name="$1"; shift
      if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
      "$@" "${common[@]}" --output "$out/v2_s${seed}_$name" --name "$name"
    }
    run shapes_gates              $py trainer/train.py --stage mid
    run shapes_gates_high         $py trainer/train.py --stage high
    run shapes_gates_high_mask    $py trainer/train.py --stage high --mask-loss 1.0
    run shapes_gates_output       $py trainer/train.py --stage high --straight-through output
    run shapes_gates_output_mask  $py trainer/train.py --stage high --straight-through output --mask-loss 1.0
    run shapes_gates_soft         $py trainer/train.py --stage high --gate soft
    run shapes_control            $py -m maskattn_shapes.control --stage high
    ;;
  install)  # the seed-0 gate files, float16, and the control into the pack (what the Loader lists and the study reads)
    rm -f maskattn_shapes/gates/*.safetensors
    for f in "$out"/v2_s0_shapes_gates*/shapes_gates*.safetensors; do
      $py -c "import sys; from maskattn_comfy import host; host.boot(cpu=True); import torch; from maskattn_core.gate_file import load_gate_file, save_gate_file; save_gate_file(load_gate_file(sys.argv[1]), sys.argv[2], dtype=torch.float16)" "$f" "maskattn_shapes/gates/$(basename "$f")"
    done
    cp "$out/v2_s0_shapes_control/shapes_control.safetensors" maskattn_shapes/weights/shapes_control.safetensors
    ;;
  study)  # the committed base, the committed gates and control (after install); then the region study
    $py -m maskattn_shapes.study --per-kind "${PER_KIND:-80}" --out "$out/study_v2"
    $py -m maskattn_shapes.diagnose --parts oracle --per-kind 40 --json "$out/regions_v2.json" \
      --gates maskattn_shapes/gates/shapes_gates_high.safetensors maskattn_shapes/gates/shapes_gates_output_mask.safetensors
    $py -m maskattn_shapes.localisation --per-kind 10 --json "$out/localisation_v2.json" --gates maskattn_shapes/gates/*.safetensors
    ;;
  *) echo "usage: bash scripts/shapes_v2.sh base|shapes|longer|nouns|soften|temper|diagnose|gates|install|study" >&2; exit 2 ;;
esac
