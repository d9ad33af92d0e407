#!/usr/bin/env bash
# The embedded end-to-end demo, offline on a CPU (8-17 minutes on 2 cores): the Python standard
# library's source as corpus -> a small GPT teacher -> a Hyena student distilled from it, and the same
# student trained from scratch on the same tokens -> out-distill-pystdlib-cpu/report.{md,json,png}.
#   bash demo.sh
set -euo pipefail
cd "$(dirname "$0")"
python data/pystdlib/prepare.py
python train_teacher.py config/train_teacher_pystdlib_cpu.py
python distill.py config/distill_pystdlib_cpu.py
