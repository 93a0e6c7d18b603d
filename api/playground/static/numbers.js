// The numbers shown under an answer: time to first token, tokens per second and token counts,
// from the row's metadata (return_metadata) and the time the page saw its first token.

export function describeNumbers(row, firstTokenMs) {
  const parts = [];
  const ttft = row && row.time_to_first_token_ms != null ? row.time_to_first_token_ms : firstTokenMs;
  if (ttft != null) parts.push(`time to first token ${Math.round(ttft)} ms`);
  if (row) {
    const speed = tokensPerSecond(row);
    if (speed != null) parts.push(`${speed.toFixed(1)} tokens/s`);
    if (row.prompt_tokens != null) parts.push(`${row.prompt_tokens} prompt tokens`);
    if (row.completion_tokens != null) parts.push(`${row.completion_tokens} generated tokens`);
    if (row.cached_prompt_tokens) parts.push(`${row.cached_prompt_tokens} from the prefix cache`);
    if (row.finish_reason) parts.push(`finish: ${row.finish_reason}`);
  }
  return parts.join(" · ");
}

// Decode speed: the tokens after the first over the time after the first.
function tokensPerSecond(row) {
  const { completion_tokens: tokens, time_to_first_token_ms: first, total_time_ms: total } = row;
  if (tokens == null || total == null) return null;
  if (tokens > 1 && first != null && total > first) return ((tokens - 1) * 1000) / (total - first);
  return total > 0 ? (tokens * 1000) / total : null;
}
