"""The shared configurator: defaults, config files, --key=value overrides, and its one-line errors."""
import ast
import glob
import os

import pytest

from conftest import REPO
from configurator import ConfigError, configure


def defaults():
    return dict(batch_size=12, learning_rate=6e-4, compile=True, device='auto', hyena_layers=None,
                betas=(0.9, 0.95))


def script_defaults(script):
    """The module-level config keys of a script (its assignments of plain literals), without running it."""
    tree = ast.parse(open(os.path.join(REPO, script)).read())
    scope = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                scope[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return scope


def test_overrides_replace_defaults_and_parse_literals():
    scope = defaults()
    config = configure(scope, ['--batch_size=32', '--compile=False', '--device=cuda:1', '--hyena_layers=[0, 2]'])
    assert config['batch_size'] == 32 and config['compile'] is False and config['device'] == 'cuda:1'
    assert config['hyena_layers'] == [0, 2]
    assert scope['batch_size'] == 32  # the script's globals change too


def test_int_given_for_a_float_key_becomes_a_float():
    config = configure(defaults(), ['--learning_rate=1'])
    assert config['learning_rate'] == 1.0 and isinstance(config['learning_rate'], float)


def test_unknown_key_is_an_error_listing_the_valid_keys():
    with pytest.raises(ConfigError) as e:
        configure(defaults(), ['--batchsize=32'])
    message = str(e.value)
    assert "unknown key 'batchsize'" in message
    assert 'batch_size' in message and 'learning_rate' in message


def test_wrong_type_is_an_error_naming_the_key_and_expected_type():
    with pytest.raises(ConfigError) as e:
        configure(defaults(), ['--batch_size=lots'])
    assert 'batch_size' in str(e.value) and 'expects int' in str(e.value)


def test_none_is_only_for_keys_that_are_unset_by_default():
    assert configure(defaults(), ['--hyena_layers=None'])['hyena_layers'] is None
    with pytest.raises(ConfigError, match='batch_size expects int, got None'):
        configure(defaults(), ['--batch_size=None'])


def test_config_file_is_executed_over_the_defaults(tmp_path):
    path = tmp_path / 'cfg.py'
    path.write_text("import math\n_helper = 3\nbatch_size = 2 * _helper\nlearning_rate = math.sqrt(4e-6)\n")
    config = configure(defaults(), [str(path)])
    assert config['batch_size'] == 6 and config['learning_rate'] == pytest.approx(2e-3)


def test_overrides_after_a_config_file_win(tmp_path):
    path = tmp_path / 'cfg.py'
    path.write_text("batch_size = 4\n")
    assert configure(defaults(), [str(path), '--batch_size=8'])['batch_size'] == 8


def test_unknown_key_in_a_config_file_is_an_error(tmp_path):
    path = tmp_path / 'cfg.py'
    path.write_text("batch_sise = 4\n")
    with pytest.raises(ConfigError, match="unknown key 'batch_sise'"):
        configure(defaults(), [str(path)])


def test_missing_config_file_is_an_error():
    with pytest.raises(ConfigError, match="config file 'config/nope.py' not found"):
        configure(defaults(), ['config/nope.py'])


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(REPO, 'config', 'train_*.py'))))
def test_shipped_training_configs_name_only_train_teacher_keys(path):
    config = configure(script_defaults('train_teacher.py'), [path])
    assert config['max_iters'] > 0 and config['lr_decay_iters'] <= config['max_iters']


def test_train_teacher_hyena_layers_accepts_a_list_a_string_or_all():
    for value, expected in (('[0, 2]', [0, 2]), ('all', 'all'), ("'0,2'", '0,2'), ("''", '')):
        assert configure(script_defaults('train_teacher.py'), [f'--hyena_layers={value}'])['hyena_layers'] == expected


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(REPO, 'config', 'distill_*.py'))))
def test_shipped_distill_configs_name_only_distill_keys(path):
    config = configure(script_defaults('distill.py'), [path])
    assert config['kd_iters'] > 0 and config['align_mode'] in ('progressive', 'parallel')
