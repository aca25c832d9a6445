"""The training dock's progress: the validation Dice in the status line and as a second line in the loss plot."""


from napari_sparse3d._napari.loss_plot import DICE_COLOUR
from napari_sparse3d._napari.progress import ProgressView
from napari_sparse3d.engine.training import TrainReport


def _report(iteration, val_dice=None):
    return TrainReport(iteration, 1.0 / iteration, 1e-3, float(iteration), 0.1, iteration / 100, val_dice=val_dice)


def _dice_pixels(plot):
    """Pixels of the Dice line's colour in the rendered plot."""
    plot.resize(300, 120)
    image = plot.grab().toImage()
    colour = DICE_COLOUR.rgb()
    return sum(image.pixel(x, y) == colour for x in range(image.width()) for y in range(image.height()))


def test_validation_dice_in_the_status_and_the_plot(qtbot):
    view = ProgressView()
    qtbot.addWidget(view)
    view.begin(budgeted=False, clear_plot=True)
    for it in range(1, 25):
        view.training(_report(it))
    assert "val Dice" not in view.status.value  # not measured yet
    assert _dice_pixels(view.plot) == 0
    view.training(_report(25, 0.87))
    assert "val Dice 0.87" in view.status.value
    view.training(_report(26))  # the steps between measurements keep showing the latest
    assert "val Dice 0.87" in view.status.value and "iteration 26" in view.status.value
    view.training(_report(50, 0.912))
    assert "val Dice 0.91" in view.status.value
    plot = view.plot
    assert plot.val_iterations == [25, 50] and plot.val_dices == [0.87, 0.912]
    assert len(plot.iterations) == 27  # the loss gets every step
    assert _dice_pixels(plot) > 20  # the second line is drawn


def test_a_new_job_forgets_the_old_dice(qtbot):
    view = ProgressView()
    qtbot.addWidget(view)
    view.begin(budgeted=True, clear_plot=True)
    view.training(_report(1, 0.5))
    view.training(_report(2, float("nan")))  # never shown as a number
    assert "val Dice 0.50" in view.status.value
    assert view.plot.val_dices == [0.5]
    view.begin(budgeted=True, clear_plot=False)  # a continued model: its curve goes on
    view.training(_report(3))
    assert "val Dice" not in view.status.value
    assert view.plot.val_dices == [0.5] and view.plot.iterations == [1, 2, 3]
    view.begin(budgeted=True, clear_plot=True)
    assert view.plot.val_dices == [] and view.plot.val_iterations == []
    assert _dice_pixels(view.plot) == 0  # an empty plot paints its placeholder


def test_a_job_that_ends_while_napari_builds_its_bar_leaves_no_bar_open(qtbot, monkeypatch):
    """napari's ``progress()`` runs Qt events while it builds the bar's widget: the job's end can be handled first."""
    import napari.utils

    view = ProgressView()
    qtbot.addWidget(view)
    view.begin(budgeted=False, clear_plot=True)
    real, made = napari.utils.progress, []

    def progress_that_runs_the_end_of_the_job(*args, **kwargs):
        view.finished(1.0, cancelled=False, error=None)  # what the events processed meanwhile did
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(napari.utils, "progress", progress_that_runs_the_end_of_the_job)
    view.restart()  # the prediction's own bar
    assert len(made) == 1 and made[0].desc.startswith("napari-sparse3d: predicting")
    assert made[0] not in real._all_instances  # closed: napari's activity dock no longer shows it
    assert view.activity is None
    monkeypatch.setattr(napari.utils, "progress", real)
    view.begin(budgeted=False, clear_plot=False)  # the next job gets its bar as usual
    assert view.activity is not None and view.activity in real._all_instances
    view.finished(1.0, cancelled=False, error=None)
    assert view.activity is None
