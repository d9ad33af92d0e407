"""sample.py: text from a checkpoint (the model rebuilt from its model_args), prompts, and its errors."""
import os

from conftest import assert_one_line_error, run_script

# '!', 'Q', 'Z' are GPT-2 ids 0, 48, 57: valid prompts for the tiny 64-token vocabulary of the test models.


def test_generates_from_a_checkpoint(reference_run):
    proc = run_script('sample.py', f'--out_dir={reference_run}', '--start=!', '--num_samples=2',
                      '--max_new_tokens=12', '--device=cpu')
    assert proc.returncode == 0, proc.stderr
    samples = [s.strip('\n') for s in proc.stdout.split('---------------')[:-1]]
    assert len(samples) == 2
    assert all(s.splitlines()[-1].startswith('!') for s in samples)


def test_prompt_from_a_file_and_a_checkpoint_path(reference_run, tmp_path):
    prompt = tmp_path / 'prompt.txt'
    prompt.write_text('Q!Z')  # ids 48, 0, 57
    proc = run_script('sample.py', f"--init_from={os.path.join(reference_run, 'ckpt.pt')}",
                      f'--start=FILE:{prompt}', '--num_samples=1', '--max_new_tokens=5', '--use_cache=False')
    assert proc.returncode == 0, proc.stderr
    assert 'Q!Z' in proc.stdout


def test_prompt_outside_the_models_vocabulary_is_a_one_line_error(reference_run):
    proc = run_script('sample.py', f'--out_dir={reference_run}', '--start=hello world', '--max_new_tokens=5')
    assert_one_line_error(proc, "beyond this model's vocabulary of 64")
