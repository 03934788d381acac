// Public redirects over a seeded set of links, through the gateway.
//   k6 run -e BASE_URL=http://127.0.0.1:8080 -e ADMIN_API_KEY=... k6/redirect.js
// Options (env): LINKS (200), VUS (32), DURATION (30s), P99_MS (50).
// Fails the run when more than 0.1 % of requests fail or p99 exceeds P99_MS.
import http from 'k6/http';
import { check, fail, sleep } from 'k6';

const BASE = __ENV.BASE_URL || 'http://127.0.0.1:8080';
const KEY = __ENV.ADMIN_API_KEY;
const LINKS = parseInt(__ENV.LINKS || '200', 10);

export const options = {
  scenarios: {
    redirects: {
      executor: 'constant-vus',
      vus: parseInt(__ENV.VUS || '32', 10),
      duration: __ENV.DURATION || '30s',
    },
  },
  thresholds: {
    'http_req_failed{kind:redirect}': ['rate<0.001'],
    'http_req_duration{kind:redirect}': [`p(99)<${__ENV.P99_MS || '50'}`],
    'checks{kind:redirect}': ['rate>0.999'],
  },
};

export function setup() {
  if (!KEY) fail('set ADMIN_API_KEY');
  const codes = [];
  for (let i = 0; i < LINKS; i++) {
    // Seeding is a burst of creates: past the gateway's admin limit (50 r/s,
    // burst 100, per client address) it answers 429, which is waited out.
    let res;
    for (let attempt = 0; attempt < 30; attempt++) {
      res = http.post(
        `${BASE}/shorten`,
        JSON.stringify({ url: `https://example.com/k6/${i}` }),
        {
          headers: { Authorization: `Bearer ${KEY}`, 'Content-Type': 'application/json' },
          tags: { kind: 'setup' },
          responseCallback: http.expectedStatuses(201, 429),
        },
      );
      if (res.status !== 429) break;
      sleep(parseFloat(res.headers['Retry-After'] || '1'));
    }
    if (res.status !== 201) fail(`seeding failed: ${res.status} ${res.body}`);
    codes.push({ code: res.json('code'), url: res.json('url') });
  }
  return { codes };
}

export default function (data) {
  const link = data.codes[Math.floor(Math.random() * data.codes.length)];
  const res = http.get(`${BASE}/${link.code}`, { redirects: 0, tags: { kind: 'redirect' } });
  check(res, { 'redirects to the target': (r) => r.status === 302 && r.headers.Location === link.url }, { kind: 'redirect' });
}
