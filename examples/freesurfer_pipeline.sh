#!/usr/bin/env bash
# Register one FreeSurfer subject to another and score the aseg structures by name.
#
# Usage: examples/freesurfer_pipeline.sh FIXED_SUBJECT MOVING_SUBJECT [OUT_DIR]
#
# Reads the recon-all outputs $SUBJECTS_DIR/<subject>/mri/{brain,aseg}.mgz directly (no
# conversion to NIfTI). Every output lies on FIXED_SUBJECT's conformed grid:
#   OUT_DIR/brain_warped.mgz   MOVING's brain.mgz registered to FIXED's
#   OUT_DIR/flow.nii.gz        the displacement field (ITK/ANTs format, LPS mm)
#   OUT_DIR/aseg_warped.mgz    MOVING's aseg.mgz through the same field (nearest neighbour)
#   OUT_DIR/dice.csv           Dice per aseg structure, with FreeSurfer names
#   OUT_DIR/qc.png             slices of the registration, deformed grid, det J
#   OUT_DIR/register.json      time, NCC and mean Dice before/after
#
# Settings from the environment:
#   VITREG        the command (default: vitreg; e.g. "python3 -m vitreg.cli")
#   VITREG_OPTS   options for 'vitreg register' (default: none, vitreg's defaults)
#
# For a cohort, list the pairs in a CSV and run 'vitreg register-batch' (see the README).
set -euo pipefail

if [[ $# -lt 2 || $# -gt 3 ]]; then
    echo "usage: $0 FIXED_SUBJECT MOVING_SUBJECT [OUT_DIR]" >&2
    exit 2
fi
: "${SUBJECTS_DIR:?set SUBJECTS_DIR to the FreeSurfer subjects folder}"
fixed_subject=$1
moving_subject=$2
out=${3:-vitreg_${moving_subject}_to_${fixed_subject}}
read -r -a vitreg <<< "${VITREG:-vitreg}"
read -r -a options <<< "${VITREG_OPTS:-}"
fixed="$SUBJECTS_DIR/$fixed_subject/mri"
moving="$SUBJECTS_DIR/$moving_subject/mri"
mkdir -p "$out"

# 1. Register the skull-stripped brains; Dice of the whole aseg before and after.
"${vitreg[@]}" register "$fixed/brain.mgz" "$moving/brain.mgz" \
    -o "$out/brain_warped.mgz" --flow "$out/flow.nii.gz" --qc "$out/qc.png" \
    --fixed-labels "$fixed/aseg.mgz" --moving-labels "$moving/aseg.mgz" \
    --json "${options[@]}" > "$out/register.json"

# 2. Bring the moving subject's aseg onto the fixed subject with that field. Any other
#    image of the moving subject goes the same way, e.g.
#    vitreg warp "$moving/norm.mgz" "$out/flow.nii.gz" -o "$out/norm_warped.mgz"
"${vitreg[@]}" warp-labels "$moving/aseg.mgz" "$out/flow.nii.gz" \
    -o "$out/aseg_warped.mgz" --reference "$fixed/brain.mgz"

# 3. Dice per structure, named from FreeSurfer's colour table (built in).
"${vitreg[@]}" dice "$fixed/aseg.mgz" "$out/aseg_warped.mgz" --csv "$out/dice.csv"
