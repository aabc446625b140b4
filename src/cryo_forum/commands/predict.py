"""Predict the orientation and its uncertainty for every particle of a STAR (or cryoSPARC .cs) file.

Writes a STAR file that keeps every input block and column, with the predicted rlnAngleRot/Tilt/Psi
(degrees) and uncertainty columns: _cfExpectedErrorDeg (the expected angular error, the default score of
filter and evaluate), _cfDispersionTrace, _cfMaxDispersion (larger = less sure), _cfEigenGap (larger = surer)
and the four eigenvalues; with the run's calibration also _cfJunkScore (the directional junk score) and
_cfErrorBound90Deg (calibrated on the validation particles: 90 % of the particles are closer to their true pose).
Images are read and predicted in batches, so memory does not grow with the stack.
Particles without origins (picked, never aligned) get them when a reference map is at hand (the run's own, made
when it pre-trained on its consensus set, or --reference): the network predicts each particle re-centred at every
trial origin of a grid within --max-shift, the trial whose pose the map's projection fits best is kept, and the
particle re-centred there is predicted again and its origin refined (rlnOriginX/YAngst and _cfShiftScore are
written).
The network's poses and origins are then finished by a local search against the run's reference.mrc when it has
one (--refine MAP: another map; --no-refine: the network's own), as `cryo-forum refine` does: the refined angles
and origins, _cfMatchScore, _cfFitJunkScore (how badly the map explains the image, a directional z-score:
the recommended junk score after refinement), _cfRefinedErrorDeg and, when the run calibrated it,
_cfRefinedBound90Deg are written; the network's uncertainty columns are kept. Refined particles are kept in
OUT.partial/ as they finish, so the same command, interrupted, resumes the refinement where it stopped.
A warning is logged when the predicted viewing directions collapse onto a few views.

Examples:
  cryo-forum predict --model run1 --star particles.star --out predicted.star --subset test
  cryo-forum predict --model run1 --star rest.star --out refined.star --refine map.mrc
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryo_forum.commands.refine import add_refine_options, mask_file, settings_from
from cryo_forum.errors import CryoForumError

SUBSETS = ("all", "train", "val", "test")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, metavar="RUN", help="a cryo-forum run folder")
    parser.add_argument("--star", type=Path, required=True, help="particles (.star or .cs)")
    parser.add_argument("--out", type=Path, required=True, help="output STAR file")
    parser.add_argument("--subset", choices=SUBSETS, default="all", help="particles of the run's split (default: all)")
    parser.add_argument("--datadir", type=Path, help="folder to look for particle stacks in")
    parser.add_argument(
        "--reference",
        type=Path,
        metavar="MAP",
        help="map to search the origins of particles without them against (default: the run's reference.mrc, "
        "made when it pre-trained on its consensus set; none: origins are not searched)",
    )
    parser.add_argument(
        "--max-shift",
        type=float,
        metavar="PX",
        help="how far from the box centre (px) the origins of particles without them are looked for (default: "
        "3 x the spread of the training particles' origins; a tenth of the box for runs trained on a map)",
    )
    refine = parser.add_mutually_exclusive_group()
    refine.add_argument(
        "--refine",
        type=Path,
        metavar="MAP",
        help="finish the poses and origins with a local search against MAP (default: the run's reference.mrc, "
        "made when it pre-trained on its consensus set)",
    )
    refine.add_argument("--no-refine", action="store_true", help="keep the network's poses and origins")
    add_refine_options(parser, symmetry=False)
    parser.add_argument("--batch-size", type=int, default=256, help="particles per batch (default: 256)")


def subset_indices(run, subset: str, particles):
    """Indices of ``subset`` of the run's split (None for all), checked against these particles."""
    if subset == "all":
        return None
    split = run.load_split()
    if split.mode == "map":
        raise CryoForumError(
            f"--subset {subset}: {run.path} was trained from a map; predict its fixed sets with --star "
            f"{run.fixed_set(subset)}"
        )
    return split.indices_for(particles)[subset]


def _add_calibrated_columns(table, run) -> None:
    """The directional junk score and the network's 90 % error bound, when the run's calibration has them (qcqp
    runs). Refinement writes its own bound (:mod:`cryo_forum.prediction.refinement`)."""
    from cryo_forum.io import star
    from cryo_forum.prediction.calibration import error_bounds, scores_from_table

    if star.EXPECTED_ERROR not in table or not run.file("calibration.json").exists():
        return
    calibration = run.load_calibration()
    if "directional" in calibration:
        table[star.JUNK_SCORE] = scores_from_table(table, "junk_score", "the predictions", calibration)
    bounds = error_bounds(calibration, "network", table[star.EXPECTED_ERROR])
    if bounds is not None:
        table[star.ERROR_BOUND] = bounds


def main(args: argparse.Namespace) -> int:
    import numpy as np

    from cryo_forum.analysis.coverage import warn_if_collapsed
    from cryo_forum.geometry import euler_to_quaternion
    from cryo_forum.io import star
    from cryo_forum.io.guard import OutputGuard
    from cryo_forum.io.partial import PartialResults
    from cryo_forum.io.particles import ParticleSet
    from cryo_forum.prediction.search_map import search_map

    if args.batch_size < 1:
        raise CryoForumError(f"--batch-size: must be positive, got {args.batch_size}")
    if args.max_shift is not None and not args.max_shift >= 0:
        raise CryoForumError(f"--max-shift: must be >= 0 px, got {args.max_shift}")
    particles = ParticleSet.open(args.star, datadir=args.datadir)
    guard = OutputGuard().protect_particles(particles).protect(args.model, "a file of the run")
    guard.protect(args.reference).protect(args.refine).protect(mask_file(args.mask), "the mask").check_file(args.out)
    particles.validate()

    from cryo_forum.prediction.predict import Centring, predict_particles, preprocessor_for
    from cryo_forum.training.run import REFERENCE_NAME, Run, load_run

    model, config, trained_preprocessor = load_run(args.model)
    run = Run(args.model)
    refine_path = _refine_map(args, run)
    indices = subset_indices(run, args.subset, particles)
    preprocessor = preprocessor_for(particles, trained_preprocessor)
    reference = None
    reference_path = args.reference or (run.file(REFERENCE_NAME) if run.file(REFERENCE_NAME).exists() else None)
    if reference_path is not None and not particles.has_origins:
        reference = search_map(reference_path, particles, args.mask)
    centring = Centring.for_particles(particles, preprocessor, run.load_origin_spread(), args.max_shift)
    # refinement searches a weak fit again as far as the centring looked for the origins it found
    wide_shift = centring.reach_px if reference is not None else None
    refine_settings = settings_from(args, config.symmetry, wide_shift=wide_shift) if refine_path else None
    table = predict_particles(
        model, particles, preprocessor, indices, batch_size=args.batch_size, reference=reference, centring=centring
    )
    _add_calibrated_columns(table, run)  # the network's bound sets how wide refinement searches
    partial = PartialResults.beside(args.out)
    if refine_path:
        volume = search_map(refine_path, particles, args.mask)
        table = _refined(table, particles, indices, volume, refine_settings, partial)
        _add_calibrated_columns(table, run)
    poses = euler_to_quaternion(table[list(star.ANGLES)].to_numpy(dtype=np.float64))
    warn_if_collapsed(poses, f"the predictions for {args.star}", config.symmetry)
    particles.write_star(args.out, columns=table, keep=indices)
    PartialResults.discard(partial)
    print(f"predicted {len(table)} particles -> {args.out}")
    return 0


def _refine_map(args: argparse.Namespace, run) -> Path | None:
    """The map to refine against: --refine's (checked to exist), else the run's reference when it has one."""
    from cryo_forum.training.run import REFERENCE_NAME

    if args.no_refine:
        return None
    if args.refine is None:
        return run.file(REFERENCE_NAME) if run.file(REFERENCE_NAME).exists() else None
    if not args.refine.is_file():
        raise CryoForumError(f"--refine: {args.refine}: file not found")
    return args.refine


def _refined(table, particles, indices, volume, settings, partial: Path):
    """The predictions with poses and origins refined against ``volume`` (sampled like the particles; other columns
    kept), the refined particles kept in ``partial`` as they finish."""
    import numpy as np

    from cryo_forum.geometry import euler_to_quaternion
    from cryo_forum.io import star
    from cryo_forum.prediction.refinement import refine_particles, search_widths

    chosen = particles if indices is None else particles.subset(indices)
    if star.ORIGIN_X_ANGST in table:
        origins = table[[star.ORIGIN_X_ANGST, star.ORIGIN_Y_ANGST]].to_numpy(np.float64) / chosen.pixel_size
    elif star.ORIGIN_X in table:
        origins = table[[star.ORIGIN_X, star.ORIGIN_Y]].to_numpy(np.float64)
    else:
        origins = None
    errors, settings = search_widths(table, settings)
    quaternions = euler_to_quaternion(table[list(star.ANGLES)].to_numpy(np.float64))
    refined = refine_particles(chosen, volume, quaternions, errors, origins, settings, partial=partial)
    for column in refined:
        table[column] = refined[column].to_numpy()
    return table
