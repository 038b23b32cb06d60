#!/usr/bin/env bash
# Plant each of the six bugs that survived the review of issue 26 again, one at a time, and check that its new test fails.
#
# Run from the root of a checkout, the venv active:      bash scripts/plant_survivors.sh
# Environment: PYTEST (default "python -m pytest"), KEEP_GOING (1 default; 0 stops at the first problem).
#
# For every bug: find the ONE file under tplightning/ that holds the original text (a file that moved is still found),
# copy it aside, replace the text (a literal substitution), run the named tests (they must FAIL), put the copy back
# byte for byte (uncommitted work in the checkout is kept), run the tests again (they must PASS).
# A text that is not found, or found more than once, is reported as "PATTERN NOT FOUND" with the text searched: the
# code was refactored and that entry of BUGS must be adapted to the new text (the tests themselves need not change).
# Exit status 0 only when every bug was planted, caught, and its tests pass again after the restore.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

PYTEST=${PYTEST:-python -m pytest}
KEEP_GOING=${KEEP_GOING:-1}
T=tests/test_survivors.py

if [ ! -d tplightning ] || [ ! -f "$T" ]; then
    echo "run me from the root of a tplightning checkout that has $T" >&2
    exit 2
fi

# name | original text | planted text | tests (space-separated node ids)
BUGS=(
"a: resumed lr written back without the schedule's factor|g[\"lr\"] = base * f(s.last_epoch)|g[\"lr\"] = base|$T::test_reapplied_learning_rate_continues_the_rebuilt_schedule_at_the_resumed_epoch"
"b: DFA without the output derivative D_{s_L}|delta = self._output[0].derivative(step.pre[-1], step.hs[-1]) * (step.output_target - step.hs[-1])|delta = step.output_target - step.hs[-1]|$T::test_dfa_targets_scale_the_output_error_by_the_output_derivative"
"c: linear decay without its clamp|min(epoch, self.epochs - 1)|epoch|$T::test_linear_decay_holds_the_final_factor_after_its_horizon"
"d: BN de-normalisation of a direct (gradient) target|return t if self.direct else sigma * t + mu|return sigma * t + mu|$T::test_gradient_target_under_batch_norm_is_not_de_normalised"
"e: the same feedback-noise seed on every DDP rank|manual_seed(self.feedback_seed + rank)|manual_seed(self.feedback_seed)|$T::test_feedback_noise_is_seeded_by_seed_plus_rank $T::test_feedback_updates_differ_between_ranks"
"f: regularised init with lambda/sigma for lambda/sigma^2|self.weight_decay / self.noise_std**2|self.weight_decay / self.noise_std|$T::test_regularised_feedback_init_divides_lambda_by_sigma_squared"
)

work=$(mktemp -d)
file=""
restore() {  # put the file planted last back, byte for byte
    if [ -n "$file" ] && [ -f "$work/pristine" ]; then
        cp "$work/pristine" "$file" && cmp -s "$work/pristine" "$file" || { echo "RESTORE FAILED for $file (original kept in $work/pristine)" >&2; exit 4; }
        rm -f "$work/pristine"
    fi
    file=""
}
trap 'restore; rm -rf "$work"' EXIT
trap 'exit 130' INT TERM

status=0
summary=()
for entry in "${BUGS[@]}"; do
    IFS='|' read -r name old new tests <<<"$entry"
    echo "=================================================================="
    echo "bug $name"
    file=$(python - "$old" "$new" "$work/pristine" <<'EOF'
import pathlib, shutil, sys
old, new, pristine = sys.argv[1:]
hits = [(p, p.read_text().count(old)) for p in sorted(pathlib.Path("tplightning").rglob("*.py"))]
hits = [(p, n) for p, n in hits if n]
if len(hits) != 1 or hits[0][1] != 1:
    where = ", ".join(f"{p} ({n}x)" for p, n in hits) or "no file"
    print(f"    PATTERN NOT FOUND: expected exactly one occurrence in one file under tplightning/, found {where}:\n        {old}", file=sys.stderr)
    sys.exit(3)
path = hits[0][0]
shutil.copyfile(path, pristine)
path.write_text(path.read_text().replace(old, new))
print(path)
EOF
    )
    if [ -z "$file" ]; then
        summary+=("$name: PATTERN NOT FOUND (adapt its entry in BUGS)")
        status=1
        if [ "$KEEP_GOING" = 1 ]; then continue; else break; fi
    fi
    echo "  planted in $file:"
    diff -U0 "$work/pristine" "$file" | grep -E '^[-+][^-+]' | sed 's/^/    /'
    # shellcheck disable=SC2086
    $PYTEST -q -p no:cacheprovider $tests >"$work/planted.log" 2>&1
    rc_planted=$?
    echo "  tests with the bug planted (rc $rc_planted):"
    grep -E '^>|^E   ' "$work/planted.log" | head -10 | sed 's/^/    /'
    grep -E '^FAILED|^ERROR|(passed|failed|error).* in ' "$work/planted.log" | sed 's/^/    /'
    restore
    # shellcheck disable=SC2086
    $PYTEST -q -p no:cacheprovider $tests >"$work/restored.log" 2>&1
    rc_restored=$?
    echo "  after the restore (rc $rc_restored): $(tail -n 1 "$work/restored.log")"
    line="$name: planted -> "
    if [ "$rc_planted" -eq 1 ]; then line+="tests FAIL (caught)"; else line+="rc $rc_planted (NOT CAUGHT)"; status=1; fi
    if [ "$rc_restored" -eq 0 ]; then line+=", restored -> pass"; else line+=", restored -> rc $rc_restored (TESTS FAIL WITHOUT THE BUG)"; status=1; fi
    summary+=("$line")
    if [ "$status" -ne 0 ] && [ "$KEEP_GOING" != 1 ]; then break; fi
done

echo "=================================================================="
printf '%s\n' "${summary[@]}"
if git rev-parse --git-dir >/dev/null 2>&1 && [ -n "$(git status --porcelain -- tplightning)" ]; then
    echo "note: tplightning/ has uncommitted changes (they were there before, or a restore went wrong):"
    git status --porcelain -- tplightning
fi
exit $status
