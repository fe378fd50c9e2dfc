# shellcheck shell=bash
# Sizes and hyper-parameters of examples/reproduce/run.sh (sourced). Two profiles:
#   full   the committed results (docs/results.md): ~1 h on a shared 2-core CPU (timings in the page)
#   smoke  tiny sizes and few steps: every stage and artefact in a few minutes (tests/test_reproduce.py)
# Any variable may be overridden from the environment (`:=` keeps a value already set).

# The paper (LET, appendix B): 2048 x 1280 tokens per step, 20B tokens => ~7630 steps, S_stop = 1500,
# i.e. alignment for the first 1500/7630 = 19.7% of training; SALT's n_KD is set to S_stop there.
PAPER_TOTAL_STEPS=7630
PAPER_STOP_STEP=1500

if [[ "${REPRO_PROFILE}" == "smoke" ]]; then
    : "${CORPUS_FLAGS:=--sources shakespeare --max-train-mb 0.6 --max-heldout-docs 2 --heldout-every 10}"
    : "${MIN_CORPUS_MB:=0}"
    : "${VOCAB_SIZE:=600}" "${TOKENIZER_SENTENCES:=20000}"
    # teacher: 1 layer x 32; student: 4 layers x 64 (k = 3 exists; 8x the teacher's non-embedding params)
    : "${TEACHER_MODEL:=--num-layers 1 --hidden-size 32 --ffn-hidden-size 88 --num-attention-heads 2}"
    : "${STUDENT_MODEL:=--num-layers 4 --hidden-size 64 --ffn-hidden-size 176 --num-attention-heads 2}"
    : "${SEQ:=32}" "${MBS:=2}" "${TEACHER_MBS:=2}"
    : "${TEACHER_ITERS:=6}" "${TRAIN_ITERS:=8}" "${EVAL_INTERVAL:=2}" "${EVAL_ITERS:=1}" "${LOG_INTERVAL:=1}"
    : "${STUDENT_MID_LAYER:=2}" "${STUDENT_LAST_LAYER:=4}" "${TEACHER_MID_LAYER:=1}"
    : "${SEEDS:=1234 2345}"
    : "${GRID_LAMBDAS:=1}" "${GRID_STOPS:=${GRID_STOP_PERCENTS:-20 40}}" "${BEST_SETTINGS:=1}"
    : "${LAYER_PAIRS:=M2E}"
    # named settings and grad-ratio runs at every seed, on mix all only (keeps CI short)
    : "${SETTINGS:=1:40}" "${ADAPTIVE:=1}" "${SETTINGS_MIXES:=all}"
    # student sizes (crossover stage): one other width, the same short budget, baseline and paper LET
    : "${SIZE_STUDENTS:=w32=--num-layers 4 --hidden-size 32 --ffn-hidden-size 88 --num-attention-heads 2}"
    : "${SIZE_TRAIN_ITERS:=8}" "${SIZE_SETTINGS:=}" "${SIZE_ADAPTIVE:=}"  # grad-ratio: covered by ADAPTIVE
    # examples/reproduce/crossover.sh's second corpus (another cut of the same archive, in smoke)
    : "${HELDOUT_CORPUS_FLAGS:=--sources shakespeare --max-train-mb 0.3 --max-heldout-docs 2 --heldout-every 7}"
    : "${HELDOUT_MIN_CORPUS_MB:=0}"
elif [[ "${REPRO_PROFILE}" == "full" ]]; then
    : "${CORPUS_FLAGS:=}"
    : "${MIN_CORPUS_MB:=20}"
    : "${VOCAB_SIZE:=8000}" "${TOKENIZER_SENTENCES:=300000}"
    # teacher T: 3 layers x 64 (FFN 176): 150K non-embedding parameters
    # student M: 6 layers x 128 (FFN 352): 1.20M non-embedding parameters = 8.0x T (paper: 10x)
    : "${TEACHER_MODEL:=--num-layers 3 --hidden-size 64 --ffn-hidden-size 176 --num-attention-heads 4}"
    : "${STUDENT_MODEL:=--num-layers 6 --hidden-size 128 --ffn-hidden-size 352 --num-attention-heads 4}"
    : "${SEQ:=128}" "${MBS:=8}" "${TEACHER_MBS:=16}"
    # the teacher sees ~6x the tokens of one student run: it stands for a "late" (well-trained) model
    : "${TEACHER_ITERS:=600}" "${TRAIN_ITERS:=200}" "${EVAL_INTERVAL:=10}" "${EVAL_ITERS:=4}" "${LOG_INTERVAL:=10}"
    : "${STUDENT_MID_LAYER:=4}" "${STUDENT_LAST_LAYER:=6}" "${TEACHER_MID_LAYER:=2}"
    : "${SEEDS:=1234 2345 3456}"
    # the committed grid; issue 23's wider one: GRID_LAMBDAS="0.1 1 3 10 30" GRID_STOPS="10 20 40 60 80"
    : "${GRID_LAMBDAS:=0.1 1 3 10}" "${GRID_STOPS:=${GRID_STOP_PERCENTS:-10 20 40}}" "${BEST_SETTINGS:=2}"
    : "${LAYER_PAIRS:=L2M L2L M2E}"
    # SETTINGS="λ0:S_stop% ..." (e.g. "3:40 10:40") and ADAPTIVE="r0[:S_stop%] ..." run at every seed;
    # not part of the committed page, so off unless set
    : "${SETTINGS:=}" "${ADAPTIVE:=}" "${SETTINGS_MIXES:=${MIXES:-all pyshake}}"
    # Crossover / size stage (STAGES=sizes; designed, not run: REPRO_PROFILE=crossover is the scaled-down
    # study that was run, docs/results-crossover.md): students of 8x and 32x the
    # teacher's 150,976 non-embedding parameters (1,205,888 and 4,878,048: 8.0x and 32.3x), each trained for
    # SIZE_TRAIN_ITERS = 1200 steps x 8 x 128 tokens = the teacher's 600 x 16 x 128 tokens, so the
    # baseline can end below the teacher. Estimated CPU cost on the 2 shared cores: ~30 min per 8x
    # run and ~2 h per 32x run (200-step runs took ~4.5 min at 8x), i.e. ~30 h for 3 seeds x
    # 4 runs x 2 sizes: a machine of its own, or fewer seeds first.
    : "${SIZE_STUDENTS:=x8=--num-layers 6 --hidden-size 128 --ffn-hidden-size 352 --num-attention-heads 4;x32=--num-layers 8 --hidden-size 224 --ffn-hidden-size 608 --num-attention-heads 4}"
    : "${SIZE_TRAIN_ITERS:=1200}" "${SIZE_SETTINGS:=3:40}" "${SIZE_ADAPTIVE:=1}"
    # the committed page's stages (sizes, ~30 h here, only when asked: STAGES=sizes; the crossover
    # profile is the study that fits a CPU)
    : "${PROFILE_STAGES:=teachers init main teacher grid best layers settings report}"
elif [[ "${REPRO_PROFILE}" == "crossover" ]]; then
    # Issue 23 (docs/results-crossover.md, driven by examples/reproduce/crossover.sh): the full
    # profile's corpus, a teacher small and short enough that students outgrow it within a CPU budget.
    # teacher T: 2 layers x 32 (FFN 88): 25,088 non-embedding parameters, 150 steps x 16 x 128 tokens
    # student (x8): 4 layers x 64 (FFN 176): 200,704 = 8.0x T; size x32: 4 x 128 (FFN 352): 802,816 = 32.0x
    # 400 steps x 8 x 128 tokens (1.33x the teacher's), evaluated every 5 steps (speed-ups resolved
    # to <= 5 % for targets reached after step 100)
    : "${CORPUS_FLAGS:=}"
    : "${MIN_CORPUS_MB:=20}"
    : "${VOCAB_SIZE:=4000}" "${TOKENIZER_SENTENCES:=300000}"
    : "${TEACHER_MODEL:=--num-layers 2 --hidden-size 32 --ffn-hidden-size 88 --num-attention-heads 2}"
    : "${STUDENT_MODEL:=--num-layers 4 --hidden-size 64 --ffn-hidden-size 176 --num-attention-heads 2}"
    : "${SEQ:=128}" "${MBS:=8}" "${TEACHER_MBS:=16}"
    : "${TEACHER_ITERS:=150}" "${TRAIN_ITERS:=400}" "${EVAL_INTERVAL:=5}" "${EVAL_ITERS:=4}" "${LOG_INTERVAL:=10}"
    : "${STUDENT_MID_LAYER:=2}" "${STUDENT_LAST_LAYER:=4}" "${TEACHER_MID_LAYER:=1}"
    : "${SEEDS:=1234 2345 3456}"
    # the wider grid of issue 23 (λ0 up to 30, S_stop up to 80 %), and λ0 0.03 below the paper's value:
    # past the crossover the best cells sit at the grid's low-λ0 edge (λ0 = 0 is the baseline itself)
    : "${GRID_LAMBDAS:=0.03 0.1 1 3 10 30}" "${GRID_STOPS:=${GRID_STOP_PERCENTS:-10 20 40 60 80}}" "${BEST_SETTINGS:=2}"
    : "${LAYER_PAIRS:=}"
    # grad-ratio: r0 1 (the flag's default) and r0 0.1 (the share λ0 0.1 has at the start here)
    : "${SETTINGS:=3:40}" "${ADAPTIVE:=1 0.1}" "${SETTINGS_MIXES:=all}"
    : "${SIZE_STUDENTS:=x32=--num-layers 4 --hidden-size 128 --ffn-hidden-size 352 --num-attention-heads 4}"
    : "${SIZE_TRAIN_ITERS:=${TRAIN_ITERS}}" "${SIZE_SETTINGS:=3:40}" "${SIZE_ADAPTIVE:=${ADAPTIVE}}"
    : "${MIXES:=all}"
    : "${PROFILE_STAGES:=teachers init grid best settings sizes report}"
    # the held-out corpus of examples/reproduce/crossover.sh: kernel documentation only, new teacher seed
    : "${HELDOUT_CORPUS_FLAGS:=--sources linux-docs}" "${HELDOUT_MIN_CORPUS_MB:=10}" "${HELDOUT_TEACHER_SEED:=8765}"
else
    echo "examples/reproduce/config.sh: REPRO_PROFILE must be full, smoke or crossover, got '${REPRO_PROFILE}'" >&2
    return 2
fi

# corpus mixes the students train on (examples/reproduce/make_mixes.py): all = every source,
# pyshake = Python docs + Shakespeare only
: "${MIXES:=all pyshake}"
: "${LR:=2e-3}" "${MIN_LR:=2e-4}" "${TEACHER_LR:=3e-3}" "${TEACHER_SEED:=4321}"
: "${LET_LAMBDA:=0.1}" "${LET_STUDENT_LAYER:=3}"
# S_stop scaled to this run as in the paper: round(1500/7630 x TRAIN_ITERS), at least 1
: "${LET_STOP_STEP:=$(( (TRAIN_ITERS * PAPER_STOP_STEP + PAPER_TOTAL_STEPS / 2) / PAPER_TOTAL_STEPS ))}"
if (( LET_STOP_STEP < 1 )); then LET_STOP_STEP=1; fi
: "${KD_WEIGHT:=0.667}" "${KD_TEMPERATURE:=0.25}"
: "${KD_STOP_STEP:=${LET_STOP_STEP}}"   # SALT's n_KD = S_stop, as in the LET paper's comparison
